//! One request lifecycle, whichever codec carries the request.
//!
//! Every policy decision of the data path is made here, as named phases over one
//! model of the request head ([`RequestHead`]) that both codecs build: the direct
//! HTTP/1.1 codec (`direct.rs`) borrows it from its parse buffer, the hyper adapter
//! (`general.rs`) from hyper's request parts. The codecs parse, frame and move bytes,
//! and decide only what they can carry; they call the phases in this order:
//!
//! ```text
//! admit ─ rewrite ─ route ─ access ─ upstream head ─ attempts ─ response head ─ body filters ─ log
//! ```
//!
//! - [`admit`]: the node's limits on the target and the declared body, and the path
//!   normalised (`path::normalize`).
//! - rewrite: global plugins before routing ([`rewrite`]).
//! - [`route`]: the router's match, the route's metrics and plugin plan.
//! - [`access`]: the plugins' access phase; an exit becomes an [`Answer`] through the
//!   response phases ([`exit_answer`]), and so does an error once it ran.
//! - upstream head: [`upstream_target`] (path and query per `path_handling` v0 and the
//!   plugins), [`request_rule`] (what happens to each header the client sent) and
//!   [`Forwarding`] (what the proxy sets: `X-Forwarded-*`, `X-Real-IP`, the request id,
//!   `Via`, `Host`).
//! - [`attempts`]: pick a target, send over an [`Upstream`] (one implementation per
//!   codec), report to passive health checks, and send again when the failure allows
//!   it ([`ProxyError::retryable`]).
//! - response head: [`response_rule`] and [`Stamp`] (hop-by-hop fields out; `Via`, the
//!   request id and latencies in), then the plugins' `header_filter`.
//! - body filters: plugins that read the whole response body (the hyper adapter; a
//!   route that has them is never planned onto the direct codec).
//! - [`finish`]: metrics, the access log line, the plugins' log phase.
//!
//! Errors are [`ProxyError`]s, rendered in one place ([`error_answer`]), through the
//! plugins' response phases when their access phase ran.

use std::borrow::Cow;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, VIA};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::time::Instant;

use super::balancer::{self, BalanceKey, HealthView};
pub use super::connect::Timeouts;
use super::error::{ErrorKind, ProxyError, Source};
use super::router::{CompiledRoute, RequestView};
use super::service::Service;
use super::telemetry::RouteMetrics;
use super::{path, ProxySnapshot, BODY_BYTES_MAX, REQUEST_ID_HEADER, RETRIES_MAX, URI_BYTES_MAX};
use crate::plugins::{self, Ctx, Exit, Instance, RoutePlan};

/// The request head as the lifecycle reads it.
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// The path as the client sent it, and its query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Path and query together, in bytes.
    pub target_len: usize,
    /// `Host` as sent (HTTP/2: the authority).
    pub host: &'a str,
    /// Every `X-Forwarded-For` line the client sent, joined in order (RFC 9110 §5.3)
    /// after hop-by-hop removal; `None` without one, or when one is not text.
    pub forwarded_for: Option<Cow<'a, str>>,
    /// The body's declared length.
    pub content_length: Option<u64>,
    /// Over TLS.
    pub tls: bool,
    /// `Content-Type: application/grpc…`.
    pub grpc: bool,
}

impl RequestHead<'_> {
    /// The protocol as plugin `protocols` name it.
    pub fn protocol(&self) -> &'static str {
        match (self.grpc, self.tls) {
            (true, true) => "grpcs",
            (true, false) => "grpc",
            (false, true) => "https",
            (false, false) => "http",
        }
    }

    /// The scheme as routes' `protocols` match it (gRPC matches as HTTP).
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// `Host`, lower case.
    pub fn host_lower(&self) -> Cow<'_, str> {
        if self.host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(self.host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(self.host)
        }
    }
}

/// Admit: the node's limits, and the normalised path routing and the upstream path use.
pub fn admit<'a>(head: &RequestHead<'a>) -> Result<Cow<'a, str>, ProxyError> {
    if head.target_len > URI_BYTES_MAX {
        return Err(ErrorKind::UriTooLong.into());
    }
    if head.content_length.is_some_and(|length| length > BODY_BYTES_MAX) {
        return Err(ErrorKind::BodyTooLarge.into());
    }
    path::normalize(head.path).ok_or_else(|| ErrorKind::InvalidPath.into())
}

/// Rewrite: global plugins' `rewrite` phase, before the router reads the request.
pub fn rewrite(
    snapshot: &ProxySnapshot,
    head: &RequestHead<'_>,
    method: &http::Method,
    path: &str,
    headers: &mut HeaderMap,
) -> Result<(), Exit> {
    if !snapshot.plugins.rewrites() {
        return Ok(());
    }
    let mut view = plugins::RewriteView { method, path, headers };
    match snapshot.plugins.rewrite(head.protocol(), &mut view) {
        Some(exit) => Err(exit),
        None => Ok(()),
    }
}

/// A routed request.
pub struct Routed<'s> {
    pub route: &'s CompiledRoute,
    /// How much of the normalised path the route matched.
    pub matched_len: usize,
    /// The regex path that matched, when one did (for `uri_captures`).
    pub regex: Option<&'s regex::Regex>,
    pub service: Option<&'s Arc<Service>>,
    pub metrics: Option<&'s Arc<RouteMetrics>>,
    /// What the route's plugins ask for.
    pub plan: RoutePlan,
}

impl<'s> Routed<'s> {
    /// The service requests go to: 503 when the route has none or it is disabled.
    pub fn service(&self) -> Result<&'s Arc<Service>, ProxyError> {
        self.service.filter(|service| service.enabled).ok_or_else(|| ErrorKind::NoService.into())
    }

    /// What `strip_path` removes: Kong's `X-Forwarded-Prefix`, unless nothing or only
    /// `/` is removed.
    pub fn stripped_prefix<'p>(&self, path: &'p str) -> Option<&'p str> {
        let prefix = path.get(..self.matched_len)?;
        (self.route.strip_path && prefix.len() > 1).then_some(prefix)
    }
}

/// Route: the best route (404 without one), its service, metrics and plugin plan.
pub fn route<'s>(snapshot: &'s ProxySnapshot, view: &RequestView<'_>) -> Result<Routed<'s>, ProxyError> {
    let found = snapshot.router.find(view).ok_or(ErrorKind::NoRoute)?;
    let route = found.route;
    Ok(Routed {
        route,
        matched_len: found.matched_len,
        regex: found.regex,
        service: route.service.and_then(|id| snapshot.services.get(&id)),
        metrics: snapshot.route_metrics.get(&route.id),
        plan: if snapshot.plugins.is_empty() { RoutePlan::default() } else { snapshot.plugins.plan(route.id) },
    })
}

/// The client's address: the peer, or for a peer in `--trusted-ips` the right-most
/// untrusted address of `X-Forwarded-For`.
/// `named` reads a request header's value (for `real_ip_header`).
pub fn client_ip<'h>(
    trusted: &super::trusted::TrustedIps,
    peer: IpAddr,
    forwarded_for: Option<&str>,
    named: impl FnOnce(&str) -> Option<&'h str>,
) -> IpAddr {
    let header = trusted.real_ip_header().and_then(named);
    trusted.client_ip(peer, forwarded_for, header)
}

/// The plugins whose access phase ran for a request, and its context.
pub struct PluginRun {
    pub ran: Vec<Arc<Instance>>,
    pub ctx: Ctx,
    /// The response phases ran, on an upstream's head or on an answer: they run once
    /// per request (a plugin's `header_filter` may take what its access phase left).
    pub filtered: bool,
}

/// What the access phase came to.
pub enum Access {
    /// Continue to the upstream (with what the plugins left, if any ran).
    Continue(Option<PluginRun>),
    /// A plugin answered.
    Exit(PluginRun, Exit),
}

/// Access: the plugins' access phase, when the route's plan says some may run. `path`
/// is the normalised path the router matched; `body` is the request body, read whole
/// only if a plugin asks for it.
#[allow(clippy::too_many_arguments)]
pub async fn access<B>(
    snapshot: &ProxySnapshot,
    routed: &Routed<'_>,
    head: &RequestHead<'_>,
    path: &str,
    client_ip: IpAddr,
    method: &http::Method,
    headers: &mut HeaderMap,
    body: &mut Option<B>,
    state: &plugins::NodeState,
) -> Access
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if !routed.plan.may_run {
        return Access::Continue(None);
    }
    let route = routed.route;
    let mut ctx = Ctx::new(client_ip, Some(route.id), route.service, method.clone(), head.protocol());
    let uri = plugins::UriMatch::new(routed.regex, path);
    let mut view = plugins::RequestView { method, path: head.path, query: head.query, headers, uri };
    let (ran, exit) = snapshot.plugins.access(&mut ctx, &mut view, body, state).await;
    let run = PluginRun { ran, ctx, filtered: false };
    match exit {
        Some(exit) => Access::Exit(run, exit),
        None => Access::Continue(Some(run)),
    }
}

/// The request body limit in force: the node's, or a plugin's below it.
pub fn body_limit(run: Option<&PluginRun>) -> u64 {
    run.and_then(|run| run.ctx.body_limit).map_or(BODY_BYTES_MAX, |limit| limit.min(BODY_BYTES_MAX))
}

/// The method sent upstream: the client's, unless a plugin replaced it.
pub fn upstream_method<'a>(method: &'a str, run: Option<&'a PluginRun>) -> &'a str {
    run.and_then(|run| run.ctx.upstream_method.as_ref()).map_or(method, http::Method::as_str)
}

/// Upstream head: the path and query sent upstream (Kong's `path_handling: v0`, or
/// what a plugin put in their place).
pub fn upstream_target(
    service: &Service,
    routed: &Routed<'_>,
    path: &str,
    query: Option<&str>,
    run: Option<&PluginRun>,
) -> Result<PathAndQuery, ProxyError> {
    let strip = routed.route.strip_path;
    let replaced_path = run.and_then(|run| run.ctx.upstream_path.clone());
    let mut target = replaced_path.unwrap_or_else(|| {
        let postfix = if strip { path::postfix(path, routed.matched_len) } else { path };
        path::upstream_path_v0(&service.path, path, postfix, strip)
    });
    let query = match run {
        Some(run) if run.ctx.upstream_query.is_some() => run.ctx.upstream_query.as_deref().filter(|q| !q.is_empty()),
        _ => query,
    };
    if let Some(query) = query {
        target.push('?');
        target.push_str(query);
    }
    // hyper's parser decides for both codecs (it drops a fragment).
    PathAndQuery::from_maybe_shared(Bytes::from(target)).map_err(|_| ErrorKind::InvalidPath.into())
}

/// Kong's `X-Forwarded-*` headers, each set by the proxy unless a trusted peer sent it
/// (`X-Forwarded-For` is always the proxy's: the client's lines with the peer added).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarded {
    For,
    Proto,
    Host,
    Port,
    Path,
    Prefix,
}

impl Forwarded {
    pub const fn name(self) -> &'static str {
        match self {
            Forwarded::For => "x-forwarded-for",
            Forwarded::Proto => "x-forwarded-proto",
            Forwarded::Host => "x-forwarded-host",
            Forwarded::Port => "x-forwarded-port",
            Forwarded::Path => "x-forwarded-path",
            Forwarded::Prefix => "x-forwarded-prefix",
        }
    }

    /// The name as a header name made at compile time (`HeaderName::from_static` on
    /// a name known only at run time parses it on every call).
    pub fn header(self) -> HeaderName {
        ProxyField::Forwarded(self).header()
    }
}

/// A field the proxy sets, upstream or on a response. The codecs that write heads
/// take its name (a literal where the call is inlined); a header map takes its
/// header name, made at compile time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyField {
    Forwarded(Forwarded),
    RealIp,
    RequestId,
    Via,
    Host,
    UpstreamLatency,
    ProxyLatency,
}

impl ProxyField {
    pub const fn name(self) -> &'static str {
        match self {
            ProxyField::Forwarded(forwarded) => forwarded.name(),
            ProxyField::RealIp => "x-real-ip",
            ProxyField::RequestId => REQUEST_ID_HEADER,
            ProxyField::Via => "via",
            ProxyField::Host => "host",
            ProxyField::UpstreamLatency => UPSTREAM_LATENCY_HEADER,
            ProxyField::ProxyLatency => PROXY_LATENCY_HEADER,
        }
    }

    pub fn header(self) -> HeaderName {
        // Each made from `name()` at compile time.
        const fn made(field: ProxyField) -> HeaderName {
            HeaderName::from_static(field.name())
        }
        const FOR: HeaderName = made(ProxyField::Forwarded(Forwarded::For));
        const PROTO: HeaderName = made(ProxyField::Forwarded(Forwarded::Proto));
        const FORWARDED_HOST: HeaderName = made(ProxyField::Forwarded(Forwarded::Host));
        const PORT: HeaderName = made(ProxyField::Forwarded(Forwarded::Port));
        const PATH: HeaderName = made(ProxyField::Forwarded(Forwarded::Path));
        const PREFIX: HeaderName = made(ProxyField::Forwarded(Forwarded::Prefix));
        const REAL_IP: HeaderName = made(ProxyField::RealIp);
        const UPSTREAM_LATENCY: HeaderName = made(ProxyField::UpstreamLatency);
        const PROXY_LATENCY: HeaderName = made(ProxyField::ProxyLatency);
        match self {
            ProxyField::Forwarded(Forwarded::For) => FOR,
            ProxyField::Forwarded(Forwarded::Proto) => PROTO,
            ProxyField::Forwarded(Forwarded::Host) => FORWARDED_HOST,
            ProxyField::Forwarded(Forwarded::Port) => PORT,
            ProxyField::Forwarded(Forwarded::Path) => PATH,
            ProxyField::Forwarded(Forwarded::Prefix) => PREFIX,
            ProxyField::RealIp => REAL_IP,
            ProxyField::RequestId => REQUEST_ID_NAME,
            ProxyField::Via => VIA,
            ProxyField::Host => HOST,
            ProxyField::UpstreamLatency => UPSTREAM_LATENCY,
            ProxyField::ProxyLatency => PROXY_LATENCY,
        }
    }
}

pub const REQUEST_ID_NAME: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);

/// What happens to a request header the client sent, on the way upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestRule {
    /// Sent as it came.
    Keep,
    /// Hop-by-hop (RFC 9110 §7.6.1), set by the proxy alone (`X-Real-IP`, the request
    /// id), or httpoxy's `Proxy` (a CGI-style upstream reads it as `HTTP_PROXY`).
    Drop,
    /// One of Kong's `X-Forwarded-*`: kept from a trusted peer (not `-For`).
    Forwarded(Forwarded),
    /// `Host`: the upstream's, unless the route preserves the client's.
    Host,
    /// `Content-Length`: the codec frames the body it sends.
    Length,
}

/// The rule for a request header (by name, any case).
pub fn request_rule(name: &str) -> RequestRule {
    let is = |wanted: &str| name.eq_ignore_ascii_case(wanted);
    match name.len() {
        2 if is("te") => RequestRule::Drop,
        4 if is("host") => RequestRule::Host,
        5 if is("proxy") => RequestRule::Drop,
        7 if is("upgrade") || is("trailer") => RequestRule::Drop,
        9 if is("x-real-ip") => RequestRule::Drop,
        10 if is("connection") || is("keep-alive") => RequestRule::Drop,
        14 if is("content-length") => RequestRule::Length,
        15 if is("x-forwarded-for") => RequestRule::Forwarded(Forwarded::For),
        16 if is("x-forwarded-host") => RequestRule::Forwarded(Forwarded::Host),
        16 if is("x-forwarded-port") => RequestRule::Forwarded(Forwarded::Port),
        16 if is("x-forwarded-path") => RequestRule::Forwarded(Forwarded::Path),
        16 if is("proxy-connection") => RequestRule::Drop,
        17 if is("x-forwarded-proto") => RequestRule::Forwarded(Forwarded::Proto),
        17 if is("transfer-encoding") => RequestRule::Drop,
        18 if is("x-forwarded-prefix") => RequestRule::Forwarded(Forwarded::Prefix),
        21 if is(REQUEST_ID_HEADER) => RequestRule::Drop,
        _ => RequestRule::Keep,
    }
}

/// RFC 9110 §7.6.1's hop-by-hop fields.
pub fn is_hop_by_hop(name: &str) -> bool {
    let is = |wanted: &str| name.eq_ignore_ascii_case(wanted);
    match name.len() {
        2 => is("te"),
        7 => is("upgrade") || is("trailer"),
        10 => is("connection") || is("keep-alive"),
        16 => is("proxy-connection"),
        17 => is("transfer-encoding"),
        _ => false,
    }
}

/// Removes hop-by-hop fields, and every field `Connection` names, from a header map.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there are none: one pass over the names (no hashing) says so.
    if !headers.keys().any(|name| is_hop_by_hop(name.as_str())) {
        return;
    }
    // Whether `Connection` names anything but hop-by-hop fields and `close` (an
    // upstream's `keep-alive` does not).
    let names_others = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(connection_tokens)
        .any(|token| !token.eq_ignore_ascii_case("close") && !is_hop_by_hop(token));
    // One field at a time, each found by a pass over the names (no list to allocate;
    // usually `Connection` is the only one), `Connection` last: it says what else goes.
    loop {
        let doomed = {
            let listed = headers.get_all(CONNECTION);
            let named = |name: &HeaderName| {
                names_others
                    && listed.iter().flat_map(connection_tokens).any(|token| token.eq_ignore_ascii_case(name.as_str()))
            };
            headers.keys().find(|name| **name != CONNECTION && (is_hop_by_hop(name.as_str()) || named(name))).cloned()
        };
        match doomed {
            Some(name) => headers.remove(name),
            None => break,
        };
    }
    headers.remove(CONNECTION);
}

/// The field names a `Connection` value lists.
fn connection_tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value.to_str().ok().into_iter().flat_map(|value| value.split(',')).map(str::trim).filter(|token| !token.is_empty())
}

/// httpoxy's `Proxy`, never sent upstream.
const PROXY_NAME: HeaderName = HeaderName::from_static("proxy");

/// `Via` as the proxy adds it, both ways.
pub const VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 tollgate");

/// The headers the proxy sets on the upstream request, after the client's that stay.
/// Fields [`Forwarding::each`] sets, at most.
const FORWARDED_FIELDS_MAX: usize = 12;

pub struct Forwarding<'a> {
    /// The peer is in `--trusted-ips`: the `X-Forwarded-*` it sent stay.
    pub peer_trusted: bool,
    /// The client's `X-Forwarded-For` lines, joined.
    pub forwarded_for: Option<&'a str>,
    pub peer_ip: &'a [u8],
    /// `X-Real-IP`: the client.
    pub real_ip: Cow<'a, [u8]>,
    pub tls: bool,
    /// The client's `Host` (after the plugins) without its port.
    pub host: Option<&'a str>,
    /// The listener's port.
    pub port: &'a [u8],
    /// The path as the client sent it.
    pub path: &'a str,
    pub prefix: Option<&'a str>,
    pub request_id: &'a str,
    /// The `Host` the upstream gets (`None`: the transport's, from the address).
    pub upstream_host: Option<&'a [u8]>,
}

impl Forwarding<'_> {
    /// Calls `put` with each header the proxy sets, its value in pieces to be joined;
    /// `sent(header)` tells whether the client's request (hop-by-hop fields gone) has
    /// that `X-Forwarded-*` header.
    pub fn each(&self, sent: impl Fn(Forwarded) -> bool, mut put: impl FnMut(ProxyField, &[&[u8]])) {
        use ProxyField::Forwarded as F;
        match self.forwarded_for {
            Some(existing) => put(F(Forwarded::For), &[existing.as_bytes(), b", ", self.peer_ip]),
            None => put(F(Forwarded::For), &[self.peer_ip]),
        }
        let ours = |header: Forwarded| !(self.peer_trusted && sent(header));
        if ours(Forwarded::Proto) {
            put(F(Forwarded::Proto), &[if self.tls { b"https" } else { b"http" }]);
        }
        if let (true, Some(host)) = (ours(Forwarded::Host), self.host) {
            put(F(Forwarded::Host), &[host.as_bytes()]);
        }
        if ours(Forwarded::Port) {
            put(F(Forwarded::Port), &[self.port]);
        }
        if ours(Forwarded::Path) {
            put(F(Forwarded::Path), &[self.path.as_bytes()]);
        }
        if let (true, Some(prefix)) = (ours(Forwarded::Prefix), self.prefix) {
            put(F(Forwarded::Prefix), &[prefix.as_bytes()]);
        }
        put(ProxyField::RealIp, &[&self.real_ip]);
        put(ProxyField::RequestId, &[self.request_id.as_bytes()]);
        put(ProxyField::Via, &[VIA_VALUE.as_bytes()]);
        if let Some(host) = self.upstream_host {
            put(ProxyField::Host, &[host]);
        }
    }

    /// The same on a header map whose hop-by-hop fields are gone: a trusted peer's
    /// `X-Forwarded-*` stay, the proxy's replace everything else it sets.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let keep_prefix = self.peer_trusted && headers.contains_key(Forwarded::Prefix.header());
        let mut set = Vec::with_capacity(FORWARDED_FIELDS_MAX);
        self.each(
            |header| headers.contains_key(header.header()),
            |name, pieces| {
                let value = match pieces {
                    _ if name == ProxyField::Via => Ok(VIA_VALUE),
                    [one] => HeaderValue::from_bytes(one),
                    _ => HeaderValue::from_bytes(&pieces.concat()),
                };
                if let Ok(value) = value {
                    set.push((name, value));
                }
            },
        );
        // Kong's `X-Forwarded-Prefix` is absent when nothing was stripped: a client's
        // goes unless a trusted peer sent it.
        if !keep_prefix {
            headers.remove(Forwarded::Prefix.header());
        }
        headers.remove(PROXY_NAME);
        for (field, value) in set {
            if field == ProxyField::Via {
                headers.append(VIA, value);
            } else {
                headers.insert(field.header(), value);
            }
        }
    }

    /// What [`Forwarding::apply`] leaves on `headers`, written instead of set: `put`
    /// gets each field of the map that stays (`Content-Length` aside, which the codec
    /// writes), then each the proxy sets, its value in pieces. No header value is made:
    /// on the direct codec, a route whose plugins need a map would otherwise build one
    /// per forwarded field only to write it out (about a sixth of that request's
    /// instructions).
    pub fn write(&self, headers: &HeaderMap, mut put: impl FnMut(&str, &[&[u8]])) {
        let sent = |header: Forwarded| headers.contains_key(header.header());
        let keep_prefix = self.peer_trusted && sent(Forwarded::Prefix);
        // What the proxy sets replaces the map's, but `Via`, which it adds to.
        let mut replaced: [&str; FORWARDED_FIELDS_MAX] = [""; FORWARDED_FIELDS_MAX];
        let mut count = 0;
        self.each(sent, |field, _| {
            if field != ProxyField::Via && count < replaced.len() {
                replaced[count] = field.name();
                count += 1;
            }
        });
        for (name, value) in headers {
            let name = name.as_str();
            let dropped = name == "content-length"
                || name == "proxy"
                || (name == Forwarded::Prefix.name() && !keep_prefix)
                || replaced[..count].contains(&name);
            if !dropped {
                put(name, &[value.as_bytes()]);
            }
        }
        self.each(sent, |field, pieces| put(field.name(), pieces));
    }
}

/// What happens to a response header the upstream sent, on the way to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseRule {
    Keep,
    /// Hop-by-hop, or set by the proxy alone (the request id and latencies).
    Drop,
    /// `Content-Length`: the codec frames the body it sends.
    Length,
}

/// The rule for a response header (by name, any case).
pub fn response_rule(name: &str) -> ResponseRule {
    if is_hop_by_hop(name) {
        return ResponseRule::Drop;
    }
    let is = |wanted: &str| name.eq_ignore_ascii_case(wanted);
    match name.len() {
        14 if is("content-length") => ResponseRule::Length,
        21 if is(REQUEST_ID_HEADER) => ResponseRule::Drop,
        27 if is(UPSTREAM_LATENCY_HEADER) => ResponseRule::Drop,
        24 if is(PROXY_LATENCY_HEADER) => ResponseRule::Drop,
        _ => ResponseRule::Keep,
    }
}

pub const UPSTREAM_LATENCY_HEADER: &str = "x-tollgate-upstream-latency";
pub const PROXY_LATENCY_HEADER: &str = "x-tollgate-proxy-latency";

/// A value the proxy stamps on a response.
pub enum Stamped<'a> {
    Text(&'a [u8]),
    Number(u64),
}

/// An upstream response's `Content-Length` values: each a number, all the same
/// (RFC 9112 §6.3); otherwise the answer cannot be passed on (502).
pub fn check_response_lengths<'v>(values: impl Iterator<Item = &'v [u8]>) -> Result<Option<u64>, ProxyError> {
    let mut length = None;
    for value in values {
        let text = std::str::from_utf8(value).map(str::trim).unwrap_or_default();
        let parsed: u64 = text
            .parse()
            .ok()
            .filter(|_| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .ok_or(ErrorKind::UpstreamInvalid)?;
        if length.is_some_and(|seen| seen != parsed) {
            return Err(ErrorKind::UpstreamInvalid.into());
        }
        length = Some(parsed);
    }
    Ok(length)
}

/// What the proxy adds to an upstream's answer: `Via`, the request id, and the two
/// latencies (ms).
pub struct Stamp<'a> {
    pub request_id: &'a str,
    pub upstream_ms: u64,
    pub proxy_ms: u64,
}

impl Stamp<'_> {
    pub fn each(&self, mut put: impl FnMut(ProxyField, Stamped<'_>)) {
        put(ProxyField::Via, Stamped::Text(VIA_VALUE.as_bytes()));
        put(ProxyField::RequestId, Stamped::Text(self.request_id.as_bytes()));
        put(ProxyField::UpstreamLatency, Stamped::Number(self.upstream_ms));
        put(ProxyField::ProxyLatency, Stamped::Number(self.proxy_ms));
    }

    /// Response head: an upstream's headers as the client gets them, before plugins'
    /// `header_filter`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        remove_hop_by_hop(headers);
        self.each(|field, value| {
            let value = match value {
                Stamped::Text(_) if field == ProxyField::RequestId => request_id_value(self.request_id),
                Stamped::Text(_) if field == ProxyField::Via => VIA_VALUE,
                Stamped::Text(text) => HeaderValue::from_bytes(text).unwrap_or(VIA_VALUE),
                Stamped::Number(number) => HeaderValue::from(number),
            };
            if field == ProxyField::Via {
                headers.append(VIA, value);
            } else {
                headers.insert(field.header(), value);
            }
        });
    }
}

/// Runs the plugins' `header_filter` on a response head.
pub fn header_filter(run: Option<&mut PluginRun>, status: StatusCode, headers: &mut HeaderMap) {
    if let Some(run) = run {
        run.filtered = true;
        plugins::header_filter(&run.ran, &mut run.ctx, status, headers);
    }
}

/// An answer the proxy or a plugin makes (never an upstream's): what both codecs send.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// Sent unless the request was `HEAD`; `Content-Length` is the codec's to write.
    pub body: Bytes,
}

/// The one rendering of an error: Kong's JSON body with the request id, `Via`, and
/// the request id header. `run`: the plugins whose access phase ran, if any; the
/// answer then goes through their response phases as a plugin's own answer does
/// ([`exit_answer`]), since Kong runs `header_filter` on its error pages too (cors's
/// headers are on a 502 from an unreachable upstream:
/// spec/03-plugins/13-cors/01-access_spec.lua:859). Only once per request: an error
/// after the upstream's head went through them (the hyper adapter reading a body whole
/// for `body_filter`) is answered plainly.
pub fn error_answer(error: &ProxyError, run: Option<&mut PluginRun>, request_id: &str) -> Answer {
    let mut headers = HeaderMap::with_capacity(4);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    stamp_own(&mut headers, request_id);
    let answer = Answer { status: error.status(), headers, body: Bytes::from(error.body(request_id)) };
    match run {
        Some(run) if !run.filtered => through_plugins(answer, run),
        _ => answer,
    }
}

/// The request id and `Via` on an answer the proxy or a plugin made.
fn stamp_own(headers: &mut HeaderMap, request_id: &str) {
    headers.insert(REQUEST_ID_NAME, request_id_value(request_id));
    headers.append(VIA, VIA_VALUE);
}

/// The request id as a response header value, marked never to be indexed: on h2 the
/// HPACK encoder would otherwise add every response's (unique) id to the connection's
/// table, evicting what does repeat (`date`, `content-type`, the latencies) and
/// comparing each new id with every id still there (RFC 7541 §6.2.3: a literal
/// "never indexed" stays out of both ends' tables). HTTP/1 ignores the mark.
pub fn request_id_value(request_id: &str) -> HeaderValue {
    let mut value = HeaderValue::from_str(request_id).unwrap_or_else(|_| HeaderValue::from_static("-"));
    value.set_sensitive(true);
    value
}

/// A global plugin's answer in `rewrite`, before any plugin's access phase ran.
pub fn plain_exit_answer(exit: Exit, request_id: &str) -> Answer {
    let mut headers = HeaderMap::with_capacity(exit.headers.len() + 2);
    for (name, value) in exit.headers {
        headers.insert(name, value);
    }
    stamp_own(&mut headers, request_id);
    headers.remove(CONTENT_LENGTH);
    Answer { status: exit.status, headers, body: exit.body }
}

/// A plugin's own answer through the response phases, as an upstream's would go:
/// `header_filter`, then `body_filter` when a plugin wants the body.
pub fn exit_answer(exit: Exit, run: &mut PluginRun, request_id: &str) -> Answer {
    let mut headers = HeaderMap::with_capacity(exit.headers.len() + 4);
    for (name, value) in exit.headers {
        headers.insert(name, value);
    }
    stamp_own(&mut headers, request_id);
    through_plugins(Answer { status: exit.status, headers, body: exit.body }, run)
}

/// An answer a plugin or the proxy made, through the response phases of the plugins
/// whose access phase ran: `header_filter`, then `body_filter` when a plugin wants
/// the body.
fn through_plugins(answer: Answer, run: &mut PluginRun) -> Answer {
    let Answer { status, mut headers, mut body } = answer;
    run.filtered = true;
    plugins::header_filter(&run.ran, &mut run.ctx, status, &mut headers);
    if plugins::wants_body(&run.ran, &run.ctx, status, &headers) {
        plugins::body_filter(&run.ran, &mut run.ctx, status, &headers, &mut body);
    }
    // An answer of the proxy's or a plugin's own is never stored by proxy-cache.
    run.ctx.cache_store = None;
    headers.remove(CONTENT_LENGTH);
    Answer { status, headers, body }
}

/// One codec's way of sending a request to an upstream address.
pub trait Upstream {
    /// The response head, with what the codec needs to relay its body.
    type Answer;

    fn status(answer: &Self::Answer) -> u16;

    /// Sends the request to `authority` and waits for the response head, within the
    /// service's timeouts. `fresh`: not on a pooled connection. A failure is
    /// `retryable` when nothing of the request can have been acted on: no connection
    /// was made, or a reused connection closed before a byte of an answer (which
    /// [`attempts`] sends again only for an idempotent method).
    fn send(&mut self, authority: &Authority, fresh: bool) -> impl Future<Output = Result<Self::Answer, ProxyError>>;
}

/// What [`attempts`] needs to know of a request.
pub struct AttemptPlan<'a> {
    pub service: &'a Service,
    pub key: BalanceKey<'a>,
    pub health: &'a HealthView,
    /// Its body is at hand (or it has none), so it can be sent again.
    pub replayable: bool,
    /// RFC 9110 §9.2.2: a client may send it again when a connection failed.
    pub idempotent: bool,
    /// Record the upstream's address (for the access log).
    pub label: bool,
}

/// How the attempts went.
pub struct Attempted {
    pub upstream_started: Instant,
    /// The last address tried, when asked for.
    pub label: Option<String>,
}

/// RFC 9110 §9.2.2's idempotent methods.
pub fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE")
}

/// Attempts: picks a target of the service's upstream (or its own address), sends,
/// reports what it found to the passive health checks, and tries again where Kong and
/// RFC 9110 allow: a connection that could not be made, on the next target, up to the
/// service's `retries` (when more than one target is in rotation: a host's every
/// address is already tried by the connector); a reused connection the upstream
/// closed before answering, once on a fresh connection, for an idempotent request.
pub async fn attempts<U: Upstream>(
    plan: &AttemptPlan<'_>,
    upstream: &mut U,
    attempted: &mut Attempted,
) -> Result<U::Answer, ProxyError> {
    let service = plan.service;
    let balancer = service.balancer.as_deref();
    let attempts_max = match balancer {
        Some(balancer) if plan.replayable && service.retries > 0 && balancer.len() > 1 => {
            service.retries.min(RETRIES_MAX) + 1
        }
        _ => 1,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        // The pick counts as in flight until the response head arrives.
        let pick = match balancer {
            Some(balancer) => match balancer.pick(&plan.key, plan.health) {
                Some(pick) => Some(pick),
                None if balancer.is_empty() => return Err(ErrorKind::NoPeer.into()),
                None => return Err(ErrorKind::NoHealthyPeer.into()),
            },
            None => None,
        };
        let authority = match &pick {
            Some(pick) => pick.target.authority.as_ref(),
            None => service.authority.as_ref(),
        };
        let Some(authority) = authority else { return Err(ErrorKind::UpstreamUnusable.into()) };
        if plan.label {
            attempted.label = Some(authority.to_string());
        }
        let mut sent = upstream.send(authority, false).await;
        if let Err(error) = &sent {
            if error.kind == ErrorKind::UpstreamClosed && error.retryable && plan.replayable && plan.idempotent {
                tracing::debug!(%error, "reused upstream connection closed; sending again on a fresh one");
                sent = upstream.send(authority, true).await;
            }
        }
        if let (Some(balancer), Some(pick)) = (balancer.filter(|b| b.passive), &pick) {
            let observation = match &sent {
                Ok(answer) => Some(balancer::Observation::Status(U::status(answer))),
                Err(error) if error.kind.source() == Source::Client => None,
                Err(error) if error.kind == ErrorKind::UpstreamTimeout => Some(balancer::Observation::Timeout),
                Err(_) => Some(balancer::Observation::TcpFailure),
            };
            if let Some(observation) = observation {
                plan.health.report(balancer.id, &pick.target.address, observation);
            }
        }
        match sent {
            Ok(answer) => {
                if let Some(pick) = &pick {
                    pick.observe(attempted.upstream_started.elapsed());
                }
                return Ok(answer);
            }
            Err(error) if error.kind == ErrorKind::UpstreamUnreachable && error.retryable && attempt < attempts_max => {
                tracing::debug!(%error, attempt, "upstream connect failed; trying the next target");
            }
            Err(error) => return Err(error),
        }
    }
}

/// What the log phase reads of a request.
pub struct Trace<'a> {
    pub started: Instant,
    pub request_id: &'a str,
    pub method: &'a str,
    /// The path as the client sent it.
    pub path: &'a str,
    pub peer: IpAddr,
    pub tls: bool,
    pub metrics: Option<&'a RouteMetrics>,
    pub upstream: Option<&'a str>,
    pub upstream_ms: Option<f64>,
}

/// How a request ended, for the log phase.
pub struct Ending {
    pub status: u16,
    /// The answer came from the upstream.
    pub from_upstream: bool,
    /// The answer's `Content-Length`, when it had one.
    pub response_bytes: Option<u64>,
}

/// Log: metrics, the access log line and the plugins' log phase, as of `now`; returns
/// the request's latency (ms).
pub fn finish(
    trace: &Trace<'_>,
    ending: &Ending,
    run: Option<&PluginRun>,
    access_log: Option<&super::telemetry::AccessLog>,
    state: &plugins::NodeState,
    now: Instant,
) -> f64 {
    let latency_ms = now.duration_since(trace.started).as_secs_f64() * 1e3;
    let metrics = trace.metrics;
    if let Some(metrics) = metrics {
        metrics.record(ending.status, latency_ms, trace.upstream_ms);
    }
    if let Some(run) = run {
        let summary = plugins::LogSummary {
            status: ending.status,
            latency_ms,
            upstream_ms: trace.upstream_ms,
            service: metrics.map_or("", |m| m.service_label.as_str()),
            route: metrics.map_or("", |m| m.route_label.as_str()),
            from_upstream: ending.from_upstream,
            response_bytes: ending.response_bytes,
        };
        plugins::log(&run.ran, &run.ctx, &summary, state);
    }
    if let Some(access_log) = access_log {
        let round = |ms: f64| (ms * 1000.0).round() / 1000.0;
        let line = serde_json::json!({
            "time_ms": crate::clock::wall_ms(),
            "request_id": trace.request_id,
            "client_ip": trace.peer.to_string(),
            "method": trace.method,
            "path": trace.path,
            "tls": trace.tls,
            "status": ending.status,
            "service": metrics.map(|m| m.service_label.as_str()),
            "route": metrics.map(|m| m.route_label.as_str()),
            "upstream": trace.upstream,
            "latency_ms": round(latency_ms),
            "upstream_latency_ms": trace.upstream_ms.map(round),
        });
        access_log.log(line.to_string());
    }
    latency_ms
}

#[cfg(test)]
mod tests;
