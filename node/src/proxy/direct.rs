//! The direct HTTP/1.1 path: the common request, proxied by one task with no HTTP
//! library between the two sockets.
//!
//! A plain (or TLS, ALPN http/1.1) client connection starts here. Each request's head
//! is parsed in place with `httparse`; when the request is one this path handles, the
//! upstream request is written straight from the client's bytes onto a pooled upstream
//! connection the same task owns, and the upstream's response head is rewritten into
//! the client's buffer and sent with the first body bytes in one write. No boxed body,
//! no channel to a connection task, no second task, and a header map only when a
//! plugin may run or a route matches on headers. nginx works so; the general path
//! (hyper on both sides) costs about half again as much CPU per request.
//!
//! What this path handles is narrow on purpose, and everything else is *handed off*:
//! the connection, with every byte read of the request it could not take, goes to the
//! general path (hyper), which then serves it to the end. A hand-off happens only
//! before anything of the request was sent anywhere or any plugin ran, so the general
//! path sees the request exactly as the client sent it. Handed off:
//! - a head not complete in the first read (a slow or large client: hyper's timers
//!   and limits apply), or one `httparse` refuses (hostile input gets the general
//!   path's exact answers);
//! - anything but HTTP/1.1 with an origin-form target (h2c's preface, HTTP/1.0,
//!   `CONNECT`, absolute URIs), a target over [`super::URI_BYTES_MAX`] or with `#`;
//! - a target hyper's URI parser refuses;
//! - `Transfer-Encoding`, `Upgrade`, `Expect`, a duplicate `Host` or
//!   `Content-Length`, a `Connection` naming a framing field, a body not whole in the
//!   buffer (at most [`DIRECT_BODY_BYTES_MAX`]), gRPC;
//! - proxy-cache or response-transformer configured, or a global plugin with a
//!   rewrite phase (`Plugins::direct`, `Plugins::rewrites`); no route matched; a
//!   service that is missing, disabled or not plain `http`.
//!
//! Other plugins run here: the request's headers become a header map for their access
//! phase, and the headers they add to the response are written into the copied head.
//!
//! The answers are the general path's: the same upstream request headers
//! (`X-Forwarded-*` with `trusted_ips`, `X-Real-IP`, `Via`, the request id, `Host` per
//! `preserve_host`, hop-by-hop fields and the names `Connection` lists removed), the
//! same response headers, the same JSON errors (502, 503, 504), `retries` on a
//! connect failure, passive health reports, metrics and access log line. The
//! proxy's tests run through both paths.

use std::borrow::Cow;
use std::future::Future;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::HOST;
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::balancer::{self, BalanceKey};
use super::pool::{DirectConn, DirectPool};
use super::router::{strip_port, RequestView};
use super::upstream::Transport;
use super::{path, AccessEntry, ClientConn, InFlight, HEADERS_COUNT_MAX, RETRIES_MAX, URI_BYTES_MAX};

/// Bytes a client connection's read buffer starts with: a request head and a small
/// body fit in one read.
pub const CLIENT_BUFFER_BYTES: usize = 16 * 1024;
/// Largest request body the direct path sends (it must be whole in the buffer);
/// larger ones take the general path, which streams them.
pub const DIRECT_BODY_BYTES_MAX: usize = 64 * 1024;
/// Room made in an upstream connection's buffer before each read of it.
pub const UPSTREAM_READ_BYTES: usize = 16 * 1024;
/// Upstream response line and headers, in bytes: 502 above (hyper's client allows
/// about as much).
pub const UPSTREAM_HEAD_BYTES_MAX: usize = 64 * 1024;
/// Upstream response headers, in number: 502 above.
pub const UPSTREAM_HEADERS_MAX: usize = 100;
/// Chunk extensions of one chunk, and trailers of one response, in bytes: the
/// response is cut off above.
pub const CHUNK_EXTENSION_BYTES_MAX: usize = 4 * 1024;
pub const TRAILER_BYTES_MAX: usize = 16 * 1024;

/// How a connection left the direct path.
pub enum Outcome {
    /// It is done: closed by either side, failed, or idle past the keep-alive time.
    Closed,
    /// A request this path leaves to the general one: the bytes read from its first
    /// on, none of them answered or sent anywhere.
    HandOff(BytesMut),
}

/// Serves `stream`'s requests until it closes or a request is handed off.
pub async fn serve<S>(stream: &mut S, conn: &ClientConn) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let keepalive = conn.proxy.timeouts.keepalive;
    let mut buf = BytesMut::with_capacity(CLIENT_BUFFER_BYTES);
    let mut out = Vec::with_capacity(1024);
    let mut watchdog = Watchdog::new();
    // A new connection's first request has the header timeout to start; later ones
    // the keep-alive time.
    let mut idle = conn.proxy.timeouts.header;
    loop {
        if buf.is_empty() {
            buf.reserve(CLIENT_BUFFER_BYTES);
            let read = watchdog.within(Instant::now() + idle, stream.read_buf(&mut buf)).await;
            idle = keepalive;
            match read {
                Some(Ok(0)) | Some(Err(_)) => return Outcome::Closed,
                Some(Ok(_)) => {}
                None => {
                    metrics::counter!("tollgate_proxy_timeouts_total", "kind" => "keepalive").increment(1);
                    return Outcome::Closed;
                }
            }
        }
        match exchange(stream, conn, &buf, &mut out, &mut watchdog).await {
            Step::Next(used) => buf.advance(used),
            Step::Close => return Outcome::Closed,
            Step::HandOff => {
                conn.proxy.handoffs.increment(1);
                return Outcome::HandOff(buf);
            }
        }
    }
}

/// Parses a response head into `response`, with uninitialised room for its headers.
fn parse_response<'h, 'b>(
    response: &mut httparse::Response<'h, 'b>,
    buf: &'b [u8],
    headers: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> httparse::Result<usize> {
    httparse::ParserConfig::default().parse_response_with_uninit_headers(response, buf, headers)
}

/// What one request left the connection to do.
enum Step {
    /// Answered; these bytes of the buffer were the request.
    Next(usize),
    /// Answered (or broken) and the connection closes.
    Close,
    HandOff,
}

/// What the direct path does with one request header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Sent upstream as it came.
    Copy,
    Host,
    ContentLength,
    ContentType,
    Connection,
    ForwardedFor,
    ForwardedProto,
    ForwardedHost,
    ForwardedPort,
    ForwardedPath,
    ForwardedPrefix,
    /// Hop-by-hop, named by `Connection`, or replaced by the proxy: not sent.
    Drop,
    /// The direct path does not take this request.
    Refuse,
}

fn request_header_kind(name: &str) -> Kind {
    let is = |wanted: &str| name.eq_ignore_ascii_case(wanted);
    match name.len() {
        2 if is("te") => Kind::Drop,
        4 if is("host") => Kind::Host,
        // httpoxy: a CGI-style upstream reads `Proxy` as HTTP_PROXY.
        5 if is("proxy") => Kind::Drop,
        6 if is("expect") => Kind::Refuse,
        7 if is("upgrade") => Kind::Refuse,
        7 if is("trailer") => Kind::Drop,
        9 if is("x-real-ip") => Kind::Drop,
        10 if is("connection") => Kind::Connection,
        10 if is("keep-alive") => Kind::Drop,
        12 if is("content-type") => Kind::ContentType,
        14 if is("content-length") => Kind::ContentLength,
        15 if is("x-forwarded-for") => Kind::ForwardedFor,
        16 if is("x-forwarded-host") => Kind::ForwardedHost,
        16 if is("x-forwarded-port") => Kind::ForwardedPort,
        16 if is("proxy-connection") => Kind::Drop,
        16 if is("x-forwarded-path") => Kind::ForwardedPath,
        18 if is("x-forwarded-prefix") => Kind::ForwardedPrefix,
        17 if is("transfer-encoding") => Kind::Refuse,
        17 if is("x-forwarded-proto") => Kind::ForwardedProto,
        21 if is(super::REQUEST_ID_HEADER) => Kind::Drop,
        _ => Kind::Copy,
    }
}

/// Visible ASCII and spaces only: what `HeaderValue::to_str` accepts.
fn text(value: &[u8]) -> Option<&str> {
    value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)).then(|| std::str::from_utf8(value).ok()).flatten()
}

/// The comma-separated tokens of a `Connection` value.
fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(|token| token.trim_matches([' ', '\t'])).filter(|token| !token.is_empty())
}

/// What the request's headers say, read in one pass; `None` to hand it off.
struct Head<'a> {
    kinds: [Kind; HEADERS_COUNT_MAX],
    content_length: usize,
    /// The client sent a `Content-Length`.
    declared: bool,
    host: &'a str,
    /// The client asked to close after this request.
    close: bool,
    /// Every `X-Forwarded-For` line as sent, joined, for the client address (`None`
    /// when one is not text).
    forwarded_for: Option<Cow<'a, str>>,
    /// The same of the lines left after removing what `Connection` names.
    forwarded_for_kept: Option<Cow<'a, str>>,
    forwarded_proto: bool,
    forwarded_host: bool,
    forwarded_port: bool,
    forwarded_path: bool,
    forwarded_prefix: bool,
}

impl<'a> Head<'a> {
    fn read(headers: &'a [httparse::Header<'a>]) -> Option<Head<'a>> {
        let mut head = Head {
            kinds: [Kind::Copy; HEADERS_COUNT_MAX],
            content_length: 0,
            declared: false,
            host: "",
            close: false,
            forwarded_for: None,
            forwarded_for_kept: None,
            forwarded_proto: false,
            forwarded_host: false,
            forwarded_port: false,
            forwarded_path: false,
            forwarded_prefix: false,
        };
        let mut named: Vec<&str> = Vec::new();
        let (mut host, mut length) = (None, None);
        let mut forwarded_for_lines = ForwardedFor::default();
        for (index, header) in headers.iter().enumerate() {
            let kind = request_header_kind(header.name);
            head.kinds[index] = kind;
            match kind {
                Kind::Refuse => return None,
                Kind::Connection => {
                    for token in tokens(text(header.value)?) {
                        // `Connection` naming a framing field would have it removed
                        // while the body stays (a smuggled request): not here.
                        if ["upgrade", "content-length", "transfer-encoding", "host"]
                            .iter()
                            .any(|framing| token.eq_ignore_ascii_case(framing))
                        {
                            return None;
                        }
                        head.close |= token.eq_ignore_ascii_case("close");
                        named.push(token);
                    }
                }
                Kind::Host if host.is_none() => host = Some(text(header.value)?),
                Kind::ContentLength if length.is_none() => {
                    let value = text(header.value)?;
                    let parsed: usize = value.parse().ok().filter(|_| value.bytes().all(|b| b.is_ascii_digit()))?;
                    length = Some(parsed);
                }
                Kind::Host | Kind::ContentLength => return None,
                Kind::ContentType if header.value.starts_with(b"application/grpc") => return None,
                Kind::ForwardedFor => forwarded_for_lines.add(header.value),
                _ => {}
            }
        }
        head.host = host?;
        head.declared = length.is_some();
        head.content_length = length.unwrap_or(0);
        if head.content_length > DIRECT_BODY_BYTES_MAX {
            return None;
        }
        head.forwarded_for = forwarded_for_lines.chain();
        let mut kept_lines = ForwardedFor::default();
        for (index, header) in headers.iter().enumerate() {
            if !named.is_empty() && named.iter().any(|name| name.eq_ignore_ascii_case(header.name)) {
                head.kinds[index] = Kind::Drop;
                continue;
            }
            match head.kinds[index] {
                Kind::ForwardedFor => kept_lines.add(header.value),
                Kind::ForwardedProto => head.forwarded_proto = true,
                Kind::ForwardedHost => head.forwarded_host = true,
                Kind::ForwardedPort => head.forwarded_port = true,
                Kind::ForwardedPath => head.forwarded_path = true,
                Kind::ForwardedPrefix => head.forwarded_prefix = true,
                _ => {}
            }
        }
        head.forwarded_for_kept = kept_lines.chain();
        Some(head)
    }
}

/// `X-Forwarded-For` lines joined in order, as one list (RFC 9110 §5.3): a second
/// line is not a way to hide hops from `--trusted-ips`.
#[derive(Default)]
struct ForwardedFor<'a> {
    chain: Option<Cow<'a, str>>,
    /// A line was not text: no chain at all.
    broken: bool,
}

impl<'a> ForwardedFor<'a> {
    fn add(&mut self, value: &'a [u8]) {
        let Some(line) = text(value) else {
            self.broken = true;
            return;
        };
        self.chain = Some(match self.chain.take() {
            None => Cow::Borrowed(line),
            Some(chain) => Cow::Owned(format!("{chain}, {line}")),
        });
    }

    fn chain(self) -> Option<Cow<'a, str>> {
        if self.broken {
            return None;
        }
        self.chain
    }
}

/// A header map of parsed `headers`, for plugins or a router or balancer that reads
/// headers, without the hop-by-hop fields and those the client's `Connection` names
/// (as the general path has it before plugins run). `head` is the buffer they were
/// parsed from: it is copied once and the values share that copy (a value each would
/// be an allocation each).
fn header_map(headers: &[httparse::Header<'_>], head: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len() + super::REQUEST_HEADERS_ADDED);
    let shared = Bytes::copy_from_slice(head);
    let base = head.as_ptr() as usize;
    for header in headers {
        let start = (header.value.as_ptr() as usize).wrapping_sub(base);
        let value = match shared.get(start..start + header.value.len()) {
            Some(within) if within == header.value => {
                HeaderValue::from_maybe_shared(shared.slice(start..start + header.value.len()))
            }
            _ => HeaderValue::from_bytes(header.value),
        };
        if let (Ok(name), Ok(value)) = (http::HeaderName::from_bytes(header.name.as_bytes()), value) {
            map.append(name, value);
        }
    }
    super::remove_hop_by_hop(&mut map);
    map
}

/// RFC 9110 §9.2.2: requests a client may send again when a connection failed.
fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE")
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes `value` in decimal (`write!` goes through the formatting machinery).
fn put_number(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Handles the request at the start of `buf`.
async fn exchange<S>(stream: &mut S, conn: &ClientConn, buf: &[u8], out: &mut Vec<u8>, watchdog: &mut Watchdog) -> Step
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let proxy = &*conn.proxy;
    let started = Instant::now();
    // Uninitialised: filling 100 empty headers per request costs more than parsing.
    let mut headers = [const { MaybeUninit::uninit() }; HEADERS_COUNT_MAX];
    let mut request = httparse::Request::new(&mut []);
    let Ok(httparse::Status::Complete(head_len)) = request.parse_with_uninit_headers(buf, &mut headers) else {
        return Step::HandOff;
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version) else {
        return Step::HandOff;
    };
    if !target.starts_with('/') || target.len() > URI_BYTES_MAX || target.contains('#') || method == "CONNECT" {
        return Step::HandOff;
    }
    // Only targets the general path's URI parser takes: it refuses some that
    // httparse lets through (`<`, `>`, a backtick), and answers them itself.
    if http::uri::PathAndQuery::try_from(target).is_err() {
        return Step::HandOff;
    }
    let headers = request.headers;
    let Some(head) = Head::read(headers) else { return Step::HandOff };
    let request_end = head_len + head.content_length;
    if request_end > buf.len() {
        return Step::HandOff;
    }
    let (raw_path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let Some(path) = path::normalize(raw_path) else { return Step::HandOff };

    let compiled = proxy.published.load();
    let snapshot = &compiled.proxy;
    let plugins = &snapshot.plugins;
    if !plugins.is_empty() && !plugins.direct() {
        return Step::HandOff;
    }
    // A global rewrite phase runs before routing, so before this path knows whether
    // it takes the request: requests then take the general path.
    if plugins.rewrites() {
        return Step::HandOff;
    }
    let protocol = if conn.tls { "https" } else { "http" };
    // A header map only for what reads one: plugins, or routes matching on headers.
    let mut map = snapshot.router.reads_headers().then(|| header_map(headers, &buf[..head_len]));
    let method_of = || http::Method::from_bytes(method.as_bytes()).ok();
    let host = if head.host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(head.host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(head.host)
    };
    let empty = HeaderMap::new();
    let view = RequestView { method, host: &host, path: &path, headers: map.as_ref().unwrap_or(&empty), protocol };
    let Some(found) = snapshot.router.find(&view) else { return Step::HandOff };
    let route = found.route;
    let Some(service) = route.service.and_then(|id| snapshot.services.get(&id)) else { return Step::HandOff };
    if !service.enabled || !matches!(service.transport, Transport::Http1) {
        return Step::HandOff;
    }
    let with_plugins = !plugins.is_empty() && plugins.may_run(route.id, route.service);
    let http_method = match with_plugins {
        true => match method_of() {
            Some(method) => Some(method),
            None => return Step::HandOff,
        },
        false => None,
    };
    if with_plugins && map.is_none() {
        map = Some(header_map(headers, &buf[..head_len]));
    }

    // From here on the request is this path's: it is answered whatever happens.
    // (Counted now, before its answer can reach the client.)
    proxy.direct_requests.increment(1);
    let in_flight = InFlight::new(&proxy.load);
    let metrics = snapshot.route_metrics.get(&route.id).cloned();
    let request_id = proxy.next_request_id();
    let peer_ip = conn.peer.ip();
    let client_ip = match head.forwarded_for.as_deref() {
        Some(chain) => proxy.trusted_ips.client_ip(peer_ip, Some(chain)),
        None => peer_ip,
    };
    let mut upstream_label = None;
    // Metrics and the access log line, as of `now` (a clock read is not free: the
    // request reads it three times).
    let log = |status: u16, now: Instant, upstream_ms: Option<f64>, upstream: Option<&str>| {
        let latency_ms = now.duration_since(started).as_secs_f64() * 1e3;
        if let Some(metrics) = &metrics {
            metrics.record(status, latency_ms, upstream_ms);
            metrics.ingress_bytes.increment(head.content_length as u64);
        }
        if let Some(access_log) = &proxy.access_log {
            let entry = AccessEntry {
                request_id: Some(request_id.as_str()),
                client_ip: conn.peer.ip(),
                method: Some(method),
                path: Some(raw_path),
                tls: conn.tls,
                status,
                service: metrics.as_ref().map(|m| m.service_label.as_str()),
                route: metrics.as_ref().map(|m| m.route_label.as_str()),
                upstream,
                latency_ms,
                upstream_latency_ms: upstream_ms,
            };
            access_log.log(entry.line());
        }
        latency_ms
    };
    // Bytes of an answer the proxy or a plugin made, as the general path counts them.
    let egress = |bytes: u64| {
        if let Some(metrics) = &metrics {
            metrics.egress_bytes.increment(bytes);
        }
    };
    // A JSON error the proxy makes: metrics, the access log line, and the answer in
    // `out` (without its body for `HEAD`).
    let refuse = |out: &mut Vec<u8>,
                  status: StatusCode,
                  message: &str,
                  now: Instant,
                  upstream_ms: Option<f64>,
                  upstream: Option<&str>| {
        log(status.as_u16(), now, upstream_ms, upstream);
        egress(error_answer(out, status, message, request_id.as_str(), head.close, method == "HEAD"));
    };
    let labels = || {
        let service = metrics.as_ref().map_or("", |m| m.service_label.as_str());
        (service, metrics.as_ref().map_or("", |m| m.route_label.as_str()))
    };

    // Plugins' access phase, with the body at hand for those that read it.
    let mut body = Bytes::new();
    let mut plugin_run: Option<PluginRun> = None;
    if let (Some(map), Some(http_method)) = (map.as_mut(), &http_method) {
        let mut ctx = crate::plugins::Ctx::new(client_ip, Some(route.id), route.service, http_method.clone(), protocol);
        let mut view = crate::plugins::RequestView { method: http_method, path: raw_path, query, headers: map };
        let sent = Bytes::copy_from_slice(&buf[head_len..request_end]);
        let mut whole = Some(http_body_util::Full::new(sent.clone()));
        let (ran, exit) = plugins.access(&mut ctx, &mut view, &mut whole, &proxy.plugin_state).await;
        if let Some(exit) = exit {
            // A plugin's answer goes through header_filter and the log phase, as an
            // upstream's would.
            drop(in_flight);
            let status = exit.status;
            let mut answer = HeaderMap::new();
            for (name, value) in exit.headers {
                answer.insert(name, value);
            }
            answer.insert(super::REQUEST_ID_NAME, request_id.header_value());
            answer.append(http::header::VIA, super::VIA_VALUE);
            crate::plugins::header_filter(&ran, &mut ctx, status, &mut answer);
            answer.insert(http::header::CONTENT_LENGTH, HeaderValue::from(exit.body.len()));
            let latency_ms = log(status.as_u16(), Instant::now(), None, None);
            let (service, route) = labels();
            let summary = crate::plugins::LogSummary {
                status: status.as_u16(),
                latency_ms,
                upstream_ms: None,
                service,
                route,
                from_upstream: false,
                response_bytes: None,
            };
            crate::plugins::log(&ran, &ctx, &summary, &proxy.plugin_state);
            exit_head(out, status, &answer, head.close);
            // An answer to `HEAD` keeps its length and sends no body, as hyper does.
            if method != "HEAD" {
                out.extend_from_slice(&exit.body);
                egress(exit.body.len() as u64);
            }
            return answered(stream, out, head.close, request_end, conn, watchdog).await;
        }
        let body_limit = ctx.body_limit.map_or(super::BODY_BYTES_MAX, |limit| limit.min(super::BODY_BYTES_MAX));
        match ctx.request_body.take() {
            // A plugin read the body (and may have changed it): it goes as it is now,
            // with its length (set with the other headers below).
            Some(read) => body = read,
            None => body = sent,
        }
        if body.len() as u64 > body_limit {
            drop(in_flight);
            refuse(out, StatusCode::PAYLOAD_TOO_LARGE, "Request size limit exceeded", Instant::now(), None, None);
            return answered(stream, out, head.close, request_end, conn, watchdog).await;
        }
        plugin_run = Some((ran, ctx));
    }

    let (upstream_method, replaced_path, upstream_query) = match &plugin_run {
        Some((_, ctx)) => (
            ctx.upstream_method.as_ref().map_or(method, http::Method::as_str),
            ctx.upstream_path.clone(),
            if ctx.upstream_query.is_some() { ctx.upstream_query.as_deref().filter(|q| !q.is_empty()) } else { query },
        ),
        None => (method, None, query),
    };
    let postfix = if route.strip_path { path::postfix(&path, found.matched_len) } else { &*path };
    let mut upstream_path =
        replaced_path.unwrap_or_else(|| path::upstream_path_v0(&service.path, &path, postfix, route.strip_path));
    if let Some(query) = upstream_query {
        upstream_path.push('?');
        upstream_path.push_str(query);
    }
    // The general path's parser decides, as there (it drops a fragment).
    let Ok(upstream_target) = http::uri::PathAndQuery::try_from(upstream_path) else {
        drop(in_flight);
        refuse(out, StatusCode::BAD_REQUEST, "invalid request path", Instant::now(), None, None);
        return answered(stream, out, head.close, request_end, conn, watchdog).await;
    };

    // The upstream request: line, headers as the general path leaves them, body.
    out.clear();
    out.extend_from_slice(upstream_method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(upstream_target.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    match (map.as_mut(), with_plugins) {
        (Some(map), true) => {
            let client_host = map.get(HOST).cloned();
            super::remove_hop_by_hop(map);
            let upstream_host = if route.preserve_host { client_host.as_ref() } else { service.host_header.as_ref() };
            let id = request_id.header_value();
            let origin = super::Origin {
                client_host: client_host.as_ref(),
                upstream_host,
                path: raw_path,
                prefix: super::stripped_prefix(&path, found.matched_len, route.strip_path),
            };
            proxy.forwarded_headers(map, conn, client_ip, &id, origin);
            // A plugin may have taken `Host` away; the pool of the general path then
            // sends the upstream's.
            if let (false, Some(host)) = (map.contains_key(HOST), &service.host_header) {
                map.insert(HOST, host.clone());
            }
            // The body's length is ours to say, never a header the client sent.
            map.remove(http::header::CONTENT_LENGTH);
            if head.declared || !body.is_empty() {
                map.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            }
            for (name, value) in map.iter() {
                put_header(out, name.as_str().as_bytes(), value.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&body);
        }
        _ => {
            let host = if route.preserve_host { None } else { service.host_header.as_ref() };
            let origin = super::Origin {
                client_host: None,
                upstream_host: host,
                path: raw_path,
                prefix: super::stripped_prefix(&path, found.matched_len, route.strip_path),
            };
            raw_request_headers(out, conn, headers, &head, client_ip, request_id.as_str(), &origin);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&buf[head_len..request_end]);
        }
    }

    // Kong's `retries`: a connection that could not be made is tried on the next
    // target (nothing reached the upstream). The body is at hand, so any method may be.
    let balancer = service.balancer.as_deref();
    let attempts_max = match balancer {
        Some(balancer) if service.retries > 0 && balancer.len() > 1 => service.retries.min(RETRIES_MAX) + 1,
        _ => 1,
    };
    let balancer_headers;
    let balance_map = match (balancer, &map) {
        (_, Some(map)) => map,
        (Some(balancer), None) if balancer.balancer.reads_headers() => {
            balancer_headers = header_map(headers, &buf[..head_len]);
            &balancer_headers
        }
        _ => &empty,
    };
    let per_attempt = Duration::from_millis(service.connect_timeout_ms.saturating_add(service.read_timeout_ms));
    let pool = &proxy.clients.direct;
    let upstream_started = Instant::now();
    let mut attempt = 0;
    let answer = loop {
        attempt += 1;
        let pick = match balancer {
            Some(balancer) => {
                let key = BalanceKey { client_ip, headers: balance_map, path: &path, query };
                match balancer.pick(&key, &proxy.health) {
                    Some(pick) => Some(pick),
                    None if balancer.is_empty() => {
                        break Err((StatusCode::SERVICE_UNAVAILABLE, "failure to get a peer from the ring-balancer"))
                    }
                    None => {
                        break Err((
                            StatusCode::SERVICE_UNAVAILABLE,
                            "failure to get a peer from the ring-balancer: every target is unhealthy",
                        ))
                    }
                }
            }
            None => None,
        };
        let authority = match &pick {
            Some(pick) => pick.target.authority.as_ref(),
            None => service.authority.as_ref(),
        };
        let Some(authority) = authority else {
            break Err((StatusCode::BAD_GATEWAY, "the upstream address is not usable"));
        };
        if proxy.access_log.is_some() {
            upstream_label = Some(authority.to_string());
        }
        let now = if attempt == 1 { upstream_started } else { Instant::now() };
        let sent = send(pool, authority, out, idempotent(upstream_method), now, now + per_attempt, watchdog).await;
        if let (Some(balancer), Some(pick)) = (balancer.filter(|b| b.passive), &pick) {
            let observation = match &sent {
                Ok(exchange) => balancer::Observation::Status(exchange.status),
                Err(Failure::Timeout) => balancer::Observation::Timeout,
                Err(_) => balancer::Observation::TcpFailure,
            };
            proxy.health.report(balancer.id, &pick.target.address, observation);
        }
        match sent {
            Ok(exchange) => {
                if let Some(pick) = &pick {
                    pick.observe(upstream_started.elapsed());
                }
                break Ok((exchange, authority));
            }
            Err(Failure::Timeout) => break Err((StatusCode::GATEWAY_TIMEOUT, "The upstream server is timing out")),
            Err(Failure::Connect(failure)) if attempt < attempts_max => {
                tracing::debug!(%failure, attempt, "upstream connect failed; trying the next target");
            }
            Err(failure) => {
                tracing::debug!(%failure, "upstream request failed");
                break Err((StatusCode::BAD_GATEWAY, "An invalid response was received from the upstream server"));
            }
        }
    };
    let (exchange, authority) = match answer {
        Ok(answer) => answer,
        Err((status, message)) => {
            drop(in_flight);
            refuse(out, status, message, Instant::now(), None, upstream_label.as_deref());
            return answered(stream, out, head.close, request_end, conn, watchdog).await;
        }
    };
    let Exchange { mut connection, head_len: response_head_len, status } = exchange;
    let answered_at = Instant::now();
    let upstream_elapsed = answered_at.duration_since(upstream_started);
    let upstream_ms = upstream_elapsed.as_millis() as u64;
    let proxy_ms = (answered_at.duration_since(started).as_millis() as u64).saturating_sub(upstream_ms);

    // The response head, rewritten for the client.
    let framing = {
        let mut response_headers = [const { MaybeUninit::uninit() }; UPSTREAM_HEADERS_MAX];
        let mut response = httparse::Response::new(&mut []);
        let parsed = parse_response(&mut response, &connection.buf, &mut response_headers);
        match (parsed, framing(&response, upstream_method, head.close)) {
            (Ok(httparse::Status::Complete(_)), Some(framing)) => {
                // The plugins here have no response phase of their own (see
                // `Plugins::direct`): `header_filter` comes down to the headers they
                // left in the context, which replace the upstream's of those names.
                let added = plugin_run.as_ref().map_or(&[][..], |(_, ctx)| &ctx.response_headers[..]);
                let ids = (request_id.as_str(), upstream_ms, proxy_ms);
                raw_response_head(out, &response, &framing, ids, added);
                Some(framing)
            }
            _ => None,
        }
    };
    let upstream_ms_f = Some(upstream_elapsed.as_secs_f64() * 1e3);
    let Some(framing) = framing else {
        drop(in_flight);
        let message = "An invalid response was received from the upstream server";
        refuse(out, StatusCode::BAD_GATEWAY, message, answered_at, upstream_ms_f, upstream_label.as_deref());
        return answered(stream, out, head.close, request_end, conn, watchdog).await;
    };
    drop(in_flight);
    let latency_ms = log(status, answered_at, upstream_ms_f, upstream_label.as_deref());
    if let Some((ran, ctx)) = &plugin_run {
        let (service, route) = labels();
        let summary = crate::plugins::LogSummary {
            status,
            latency_ms,
            upstream_ms: upstream_ms_f,
            service,
            route,
            from_upstream: true,
            response_bytes: framing.content_length,
        };
        crate::plugins::log(ran, ctx, &summary, &proxy.plugin_state);
    }
    let read_timeout = Duration::from_millis(service.read_timeout_ms);
    let timeouts = (read_timeout, proxy.timeouts.send);
    let relayed = relay(stream, &mut connection, response_head_len, framing.body, out, timeouts, watchdog).await;
    if let Some(metrics) = &metrics {
        metrics.egress_bytes.increment(relayed.body_bytes);
    }
    if relayed.upstream_reusable && framing.upstream_keepalive {
        pool.put(authority, connection, answered_at);
    }
    if !relayed.client_ok || framing.close_client {
        return Step::Close;
    }
    Step::Next(request_end)
}

/// The plugins whose access phase ran for a request, and its context.
type PluginRun = (Vec<Arc<crate::plugins::Instance>>, crate::plugins::Ctx);

/// Sends an answer the proxy made (in `out`) and says what the connection does next.
async fn answered<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &[u8],
    close: bool,
    used: usize,
    conn: &ClientConn,
    watchdog: &mut Watchdog,
) -> Step {
    if !watchdog.send(stream, out, conn.proxy.timeouts.send).await || close {
        return Step::Close;
    }
    Step::Next(used)
}

/// The client's request headers as they go upstream, written from the parsed head
/// without a header map: what [`super::Proxy::forwarded_headers`] makes of them on the
/// general path. `origin.upstream_host` replaces the client's `Host` (`None`: it is
/// kept).
fn raw_request_headers(
    out: &mut Vec<u8>,
    conn: &ClientConn,
    headers: &[httparse::Header<'_>],
    head: &Head<'_>,
    client_ip: std::net::IpAddr,
    request_id: &str,
    origin: &super::Origin<'_>,
) {
    let peer_ip = conn.peer.ip();
    let peer_trusted = conn.proxy.trusted_ips.contains(peer_ip);
    for (header, kind) in headers.iter().zip(head.kinds) {
        let keep = match kind {
            Kind::Copy | Kind::ContentType => true,
            Kind::ForwardedProto => peer_trusted && head.forwarded_proto,
            Kind::ForwardedHost => peer_trusted && head.forwarded_host,
            Kind::ForwardedPort => peer_trusted && head.forwarded_port,
            Kind::ForwardedPath => peer_trusted && head.forwarded_path,
            Kind::ForwardedPrefix => peer_trusted && head.forwarded_prefix,
            _ => false,
        };
        if keep {
            put_header(out, header.name.as_bytes(), header.value);
        }
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(existing) = head.forwarded_for_kept.as_deref() {
        out.extend_from_slice(existing.as_bytes());
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(conn.peer_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !(peer_trusted && head.forwarded_proto) {
        put_header(out, b"x-forwarded-proto", if conn.tls { b"https" } else { b"http" });
    }
    if !(peer_trusted && head.forwarded_host) {
        put_header(out, b"x-forwarded-host", strip_port(head.host).as_bytes());
    }
    if !(peer_trusted && head.forwarded_port) {
        put_header(out, b"x-forwarded-port", conn.local_port.as_bytes());
    }
    if !(peer_trusted && head.forwarded_path) {
        put_header(out, b"x-forwarded-path", origin.path.as_bytes());
    }
    if let (false, Some(prefix)) = (peer_trusted && head.forwarded_prefix, origin.prefix) {
        put_header(out, b"x-forwarded-prefix", prefix.as_bytes());
    }
    if client_ip == peer_ip {
        put_header(out, b"x-real-ip", conn.peer_ip.as_bytes());
    } else {
        put_header(out, b"x-real-ip", client_ip.to_string().as_bytes());
    }
    put_header(out, super::REQUEST_ID_HEADER.as_bytes(), request_id.as_bytes());
    put_header(out, b"via", super::VIA_VALUE.as_bytes());
    put_header(out, b"host", origin.upstream_host.map_or(head.host.as_bytes(), HeaderValue::as_bytes));
    if head.declared {
        out.extend_from_slice(b"content-length: ");
        put_number(out, head.content_length as u64);
        out.extend_from_slice(b"\r\n");
    }
}

/// How the response body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    /// None (`HEAD`, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes.
    UntilClose,
}

struct Framing {
    body: Body,
    /// The upstream keeps the connection open after this response.
    upstream_keepalive: bool,
    /// The client connection closes after this response.
    close_client: bool,
    dated: bool,
    /// The `Content-Length` the client gets (the upstream's is never copied: a
    /// `Connection` naming it would leave the body unframed).
    content_length: Option<u64>,
}

/// How an upstream's response is framed (RFC 9112 §6.3); `None` when it is not one
/// to pass on (502): unparseable lengths, or lengths that disagree.
fn framing(response: &httparse::Response<'_, '_>, method: &str, client_close: bool) -> Option<Framing> {
    // Below 100 is no HTTP status (hyper's client refuses it too).
    let code = response.code.filter(|code| *code >= 100)?;
    let mut keepalive = response.version == Some(1);
    let (mut length, mut chunked, mut encoded, mut dated) = (None::<u64>, false, false, false);
    for header in response.headers.iter() {
        let is = |wanted: &str| header.name.eq_ignore_ascii_case(wanted);
        if is("content-length") {
            let value = text(header.value)?.trim();
            let parsed: u64 = value.parse().ok().filter(|_| value.bytes().all(|b| b.is_ascii_digit()))?;
            if length.is_some_and(|seen| seen != parsed) {
                return None;
            }
            length = Some(parsed);
        } else if is("transfer-encoding") {
            encoded = true;
            chunked =
                text(header.value)?.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if is("connection") {
            keepalive &= !tokens(text(header.value)?).any(|token| token.eq_ignore_ascii_case("close"));
        } else if is("date") {
            dated = true;
        }
    }
    // A HEAD answer that announces a body: a broken upstream may still send it, or
    // answer again; the connection is not reused (it could desync another client's
    // exchange).
    if method == "HEAD" && (encoded || length.is_some_and(|length| length > 0)) {
        keepalive = false;
    }
    let body = if method == "HEAD" || code == 204 || code == 304 || (100..200).contains(&code) {
        Body::Empty
    } else if encoded {
        if chunked {
            Body::Chunked
        } else {
            Body::UntilClose
        }
    } else {
        length.map_or(Body::UntilClose, Body::Length)
    };
    let close_client = client_close || body == Body::UntilClose;
    let content_length = match body {
        Body::Length(length) => Some(length),
        // `HEAD` and 304 keep the length the body would have had.
        Body::Empty if code != 204 && code >= 200 && !encoded => length,
        _ => None,
    };
    Some(Framing { body, upstream_keepalive: keepalive, close_client, dated, content_length })
}

/// Writes the client's response head into `out` from the upstream's parsed head,
/// without a header map: what [`super::answer_headers`] and then
/// [`crate::plugins::header_filter`] make of it. `ids` are the request id and the
/// upstream and proxy latencies (ms); `added` are headers plugins set, each replacing
/// any of its name.
fn raw_response_head(
    out: &mut Vec<u8>,
    response: &httparse::Response<'_, '_>,
    framing: &Framing,
    ids: (&str, u64, u64),
    added: &[(http::HeaderName, HeaderValue)],
) {
    let (request_id, upstream_ms, proxy_ms) = ids;
    let mut named: Vec<&str> = Vec::new();
    for header in response.headers.iter().filter(|header| header.name.eq_ignore_ascii_case("connection")) {
        named.extend(text(header.value).into_iter().flat_map(tokens));
    }
    let replaced_by_plugin = |name: &str| added.iter().any(|(added, _)| added.as_str().eq_ignore_ascii_case(name));
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    put_number(out, u64::from(response.code.unwrap_or_default()));
    out.push(b' ');
    out.extend_from_slice(response.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for header in response.headers.iter() {
        let name = header.name;
        let is = |wanted: &str| name.eq_ignore_ascii_case(wanted);
        let hop_by_hop = is("connection")
            || is("keep-alive")
            || is("proxy-connection")
            || is("te")
            || is("trailer")
            || is("transfer-encoding")
            || is("upgrade");
        let replaced = is(super::REQUEST_ID_HEADER)
            || is("x-tollgate-upstream-latency")
            || is("x-tollgate-proxy-latency")
            || is("content-length")
            || (!added.is_empty() && replaced_by_plugin(name));
        if hop_by_hop || replaced || named.iter().any(|token| token.eq_ignore_ascii_case(name)) {
            continue;
        }
        put_header(out, name.as_bytes(), header.value);
    }
    let via = super::VIA_VALUE;
    let ours: [(&str, &[u8]); 2] = [("via", via.as_bytes()), (super::REQUEST_ID_HEADER, request_id.as_bytes())];
    for (name, value) in ours {
        if !replaced_by_plugin(name) {
            put_header(out, name.as_bytes(), value);
        }
    }
    for (name, value) in [("x-tollgate-upstream-latency", upstream_ms), ("x-tollgate-proxy-latency", proxy_ms)] {
        if !replaced_by_plugin(name) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            put_number(out, value);
            out.extend_from_slice(b"\r\n");
        }
    }
    // `insert` semantics: of several added headers of one name, the last stands.
    for (index, (name, value)) in added.iter().enumerate() {
        if !added[index + 1..].iter().any(|(later, _)| later == name) {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    let dated =
        framing.dated && !replaced_by_plugin("date") || added.iter().any(|(name, _)| name == http::header::DATE);
    framing_headers(out, framing.body, framing.content_length, framing.close_client, dated);
}

/// Writes the head of a plugin's own answer from its header map (which has its
/// `Content-Length`).
fn exit_head(out: &mut Vec<u8>, status: StatusCode, headers: &HeaderMap, close: bool) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    put_number(out, u64::from(status.as_u16()));
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // Its `Content-Length` is in the map; no `Date` came with it.
    framing_headers(out, Body::Empty, None, close, false);
}

/// The end of a response head: `Content-Length` or `Transfer-Encoding`, `Connection:
/// close` when the client connection closes after it, a `Date` when none came.
fn framing_headers(out: &mut Vec<u8>, body: Body, length: Option<u64>, close: bool, dated: bool) {
    if let Some(length) = length {
        out.extend_from_slice(b"content-length: ");
        put_number(out, length);
        out.extend_from_slice(b"\r\n");
    }
    if body == Body::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !dated {
        put_header(out, b"date", httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Kong's JSON error, as the general path answers it.
/// Returns the bytes of body it wrote (none in answer to `HEAD`, as hyper does).
fn error_answer(
    out: &mut Vec<u8>,
    status: StatusCode,
    message: &str,
    request_id: &str,
    close: bool,
    head: bool,
) -> u64 {
    let body = super::error_body(message, request_id);
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: application/json; charset=utf-8\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default()
    );
    put_header(out, super::REQUEST_ID_HEADER.as_bytes(), request_id.as_bytes());
    put_header(out, b"via", super::VIA_VALUE.as_bytes());
    put_header(out, b"date", httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    let _ = write!(out, "content-length: {}\r\n", body.len());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if head {
        return 0;
    }
    out.extend_from_slice(body.as_bytes());
    body.len() as u64
}

/// An upstream response head, whole at the start of the connection's buffer.
struct Exchange {
    connection: DirectConn,
    head_len: usize,
    status: u16,
}

enum Failure {
    /// No connection could be made: nothing reached the upstream.
    Connect(super::BoxError),
    Timeout,
    /// The request may have reached the upstream; no usable answer came.
    Broken(std::io::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(failure) => write!(f, "connect: {failure}"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Broken(failure) => write!(f, "exchange: {failure}"),
        }
    }
}

/// Sends `request` to `authority` and reads the response head, by `deadline` (`now`
/// is the time it starts). A
/// pooled connection the upstream closed before answering is replaced once by a new
/// one, for an idempotent request (RFC 9110 §9.2.2).
async fn send(
    pool: &DirectPool,
    authority: &Authority,
    request: &[u8],
    idempotent: bool,
    now: Instant,
    deadline: Instant,
    watchdog: &mut Watchdog,
) -> Result<Exchange, Failure> {
    let mut fresh_only = false;
    loop {
        let pooled = if fresh_only { None } else { pool.checkout(authority, now) };
        let mut connection = match pooled {
            Some(connection) => connection,
            None => match watchdog.within(deadline, pool.connect(authority)).await {
                Some(Ok(connection)) => connection,
                Some(Err(failure)) => return Err(Failure::Connect(failure)),
                None => return Err(Failure::Timeout),
            },
        };
        match watchdog.within(deadline, read_head(&mut connection, request)).await {
            None => return Err(Failure::Timeout),
            Some(Ok((head_len, status))) => return Ok(Exchange { connection, head_len, status }),
            Some(Err(HeadFailure::Unanswered(_))) if connection.reused && idempotent => fresh_only = true,
            Some(Err(HeadFailure::Unanswered(failure) | HeadFailure::Broken(failure))) => {
                return Err(Failure::Broken(failure))
            }
        }
    }
}

enum HeadFailure {
    /// The connection failed before a byte of the response arrived.
    Unanswered(std::io::Error),
    Broken(std::io::Error),
}

/// Writes the request and reads until a final response head is whole in the
/// connection's buffer (interim 1xx answers other than 101 are skipped).
async fn read_head(connection: &mut DirectConn, request: &[u8]) -> Result<(usize, u16), HeadFailure> {
    connection.stream.write_all(request).await.map_err(HeadFailure::Unanswered)?;
    let invalid =
        |what: &str| HeadFailure::Broken(std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()));
    let mut answered = false;
    loop {
        if !connection.buf.is_empty() {
            let mut headers = [const { MaybeUninit::uninit() }; UPSTREAM_HEADERS_MAX];
            let mut response = httparse::Response::new(&mut []);
            match parse_response(&mut response, &connection.buf, &mut headers) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let code = response.code.unwrap_or_default();
                    if (100..200).contains(&code) && code != 101 {
                        connection.buf.advance(head_len);
                        continue;
                    }
                    if code == 101 {
                        return Err(invalid("the upstream switched protocols unasked"));
                    }
                    return Ok((head_len, code));
                }
                Ok(httparse::Status::Partial) if connection.buf.len() < UPSTREAM_HEAD_BYTES_MAX => {}
                Ok(httparse::Status::Partial) => return Err(invalid("upstream response head too large")),
                Err(error) => return Err(invalid(&error.to_string())),
            }
        }
        connection.buf.reserve(UPSTREAM_READ_BYTES);
        match connection.stream.read_buf(&mut connection.buf).await {
            Ok(0) if !answered => {
                return Err(HeadFailure::Unanswered(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(0) => return Err(HeadFailure::Broken(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => answered = true,
            Err(error) if !answered => return Err(HeadFailure::Unanswered(error)),
            Err(error) => return Err(HeadFailure::Broken(error)),
        }
    }
}

/// What relaying a response body came to.
struct Relayed {
    body_bytes: u64,
    /// The body ended where its framing said, with nothing after it.
    upstream_reusable: bool,
    /// Everything reached the client's socket.
    client_ok: bool,
}

/// Sends the head in `out` with the body that follows `head_len` in the connection's
/// buffer, then the rest of the body as it arrives.
async fn relay<S>(
    client: &mut S,
    connection: &mut DirectConn,
    head_len: usize,
    body: Body,
    out: &mut Vec<u8>,
    (read_timeout, send_timeout): (Duration, Duration),
    watchdog: &mut Watchdog,
) -> Relayed
where
    S: AsyncWrite + Unpin,
{
    connection.buf.advance(head_len);
    let mut relayed = Relayed { body_bytes: 0, upstream_reusable: false, client_ok: true };
    let mut remaining = match body {
        Body::Length(length) => length,
        _ => u64::MAX,
    };
    let mut chunks = Chunked::default();
    let mut first = true;
    loop {
        // What of the buffer belongs to this body, and whether the body ends there.
        let available = connection.buf.len();
        let (take, ended) = match body {
            Body::Empty => (0, true),
            Body::Length(_) => {
                let take = (remaining.min(available as u64)) as usize;
                (take, take as u64 == remaining)
            }
            Body::Chunked => match chunks.feed(&connection.buf) {
                Ok(Some(end)) => (end, true),
                Ok(None) => (available, false),
                Err(()) => {
                    tracing::debug!("upstream sent a malformed chunked body");
                    relayed.client_ok = false;
                    return relayed;
                }
            },
            Body::UntilClose => (available, false),
        };
        remaining = remaining.saturating_sub(take as u64);
        relayed.body_bytes += if body == Body::Chunked { 0 } else { take as u64 };
        // A client that stops reading is given up after the send timeout, which also
        // frees the upstream connection.
        let written = if first {
            first = false;
            out.extend_from_slice(&connection.buf[..take]);
            watchdog.send(client, out, send_timeout).await
        } else if take > 0 {
            watchdog.send(client, &connection.buf[..take], send_timeout).await
        } else {
            true
        };
        if !written {
            relayed.client_ok = false;
            return relayed;
        }
        if ended {
            relayed.upstream_reusable = available == take;
            if body == Body::Chunked {
                relayed.body_bytes = chunks.data;
            }
            return relayed;
        }
        connection.buf.clear();
        connection.buf.reserve(UPSTREAM_READ_BYTES);
        let read = connection.stream.read_buf(&mut connection.buf);
        match watchdog.within(Instant::now() + read_timeout, read).await {
            Some(Ok(0)) if body == Body::UntilClose => {
                // The body ends with the connection; the client's closes after it.
                let _ = client.flush().await;
                return relayed;
            }
            Some(Ok(0)) | Some(Err(_)) | None => {
                tracing::debug!("upstream response body cut off");
                relayed.client_ok = false;
                return relayed;
            }
            Some(Ok(_)) => {}
        }
    }
}

/// One timer per client connection for every deadline of its requests: the idle
/// keep-alive wait, the upstream's answer, body reads. Arming a tokio timer per wait
/// (`tokio::time::timeout`) costs a timer-wheel insertion and removal each time; this
/// one stays armed, and moves only when it fires before the deadline in force (it
/// then checks the time and re-arms) or when a deadline earlier than its own comes.
/// With the usual deadlines (tens of seconds) it moves about once per keep-alive
/// period, not per request.
struct Watchdog {
    sleep: Pin<Box<Sleep>>,
}

impl Watchdog {
    fn new() -> Watchdog {
        Watchdog { sleep: Box::pin(tokio::time::sleep(Duration::ZERO)) }
    }

    /// Writes all of `bytes` to `stream` unless a write makes no progress for
    /// `timeout`; whether it was written.
    async fn send<S: AsyncWrite + Unpin>(&mut self, stream: &mut S, bytes: &[u8], timeout: Duration) -> bool {
        let mut sent = 0;
        while sent < bytes.len() {
            match self.within(Instant::now() + timeout, stream.write(&bytes[sent..])).await {
                Some(Ok(0)) | Some(Err(_)) => return false,
                Some(Ok(written)) => sent += written,
                None => {
                    metrics::counter!("tollgate_proxy_timeouts_total", "kind" => "send").increment(1);
                    return false;
                }
            }
        }
        true
    }

    /// Runs `work` until `deadline`; `None` when the deadline came first.
    async fn within<F: Future>(&mut self, deadline: Instant, work: F) -> Option<F::Output> {
        if self.sleep.deadline() > deadline {
            self.sleep.as_mut().reset(deadline);
        }
        let mut work = std::pin::pin!(work);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            while self.sleep.as_mut().poll(cx).is_ready() {
                if Instant::now() >= deadline {
                    return Poll::Ready(None);
                }
                self.sleep.as_mut().reset(deadline);
            }
            Poll::Pending
        })
        .await
    }
}

/// Follows a chunked body's framing (RFC 9112 §7.1) to find where it ends; the bytes
/// themselves pass through unchanged.
#[derive(Default)]
struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
    /// Bytes of the current extension or of all trailers, for their limits.
    extra: usize,
    /// Payload bytes seen.
    data: u64,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
}

impl Chunked {
    /// Reads `bytes`; `Some(n)` when the body ends after the first `n` of them.
    fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        let mut index = 0;
        while index < bytes.len() {
            let byte = bytes[index];
            match self.state {
                ChunkState::Size => {
                    if let Some(digit) = (byte as char).to_digit(16) {
                        if self.digits == 15 {
                            return Err(());
                        }
                        self.size = self.size * 16 + u64::from(digit);
                        self.digits += 1;
                    } else if self.digits == 0 {
                        return Err(());
                    } else if byte == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if byte == b';' || byte == b' ' || byte == b'\t' {
                        self.state = ChunkState::Extension;
                        self.extra = 0;
                    } else {
                        return Err(());
                    }
                }
                ChunkState::Extension => {
                    self.extra += 1;
                    if byte == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if byte == b'\n' || self.extra > CHUNK_EXTENSION_BYTES_MAX {
                        return Err(());
                    }
                }
                ChunkState::SizeLf => {
                    if byte != b'\n' {
                        return Err(());
                    }
                    self.state = if self.size == 0 { ChunkState::TrailerStart } else { ChunkState::Data };
                    self.extra = 0;
                }
                ChunkState::Data => {
                    let take = self.size.min((bytes.len() - index) as u64);
                    self.size -= take;
                    self.data += take;
                    index += take as usize;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr if byte == b'\r' => self.state = ChunkState::DataLf,
                ChunkState::DataLf if byte == b'\n' => {
                    self.state = ChunkState::Size;
                    self.digits = 0;
                }
                ChunkState::DataCr | ChunkState::DataLf => return Err(()),
                ChunkState::TrailerStart | ChunkState::Trailer => {
                    self.extra += 1;
                    if self.extra > TRAILER_BYTES_MAX {
                        return Err(());
                    }
                    self.state = match (self.state, byte) {
                        (ChunkState::TrailerStart, b'\r') => ChunkState::EndLf,
                        (_, b'\r') => ChunkState::TrailerLf,
                        (_, b'\n') => return Err(()),
                        _ => ChunkState::Trailer,
                    };
                }
                ChunkState::TrailerLf if byte == b'\n' => self.state = ChunkState::TrailerStart,
                ChunkState::TrailerLf => return Err(()),
                ChunkState::EndLf if byte == b'\n' => return Ok(Some(index + 1)),
                ChunkState::EndLf => return Err(()),
            }
            index += 1;
        }
        Ok(None)
    }
}

/// A connection handed off by the direct path: the bytes it read come first.
pub struct Prefixed<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: BytesMut, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let take = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..take]);
            this.prefix.advance(take);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(pieces: &[&[u8]]) -> Result<Option<usize>, ()> {
        let mut chunked = Chunked::default();
        let mut offset = 0;
        for piece in pieces {
            if let Some(end) = chunked.feed(piece)? {
                return Ok(Some(offset + end));
            }
            offset += piece.len();
        }
        Ok(None)
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for value in [0, 7, 10, 12345, u64::MAX] {
            let mut out = Vec::new();
            put_number(&mut out, value);
            assert_eq!(out, value.to_string().into_bytes());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_holds_every_deadline_whatever_it_was_armed_for() {
        let second = Duration::from_secs(1);
        let mut watchdog = Watchdog::new();
        let start = Instant::now();
        assert_eq!(watchdog.within(start + 10 * second, async { 7 }).await, Some(7));
        // A long deadline: the timer fires early (armed for less), re-arms, and ends
        // at the deadline.
        assert_eq!(watchdog.within(start + 60 * second, std::future::pending::<()>()).await, None);
        assert_eq!(Instant::now(), start + 60 * second);
        // A deadline shorter than the one it is armed for moves it.
        let now = Instant::now();
        assert_eq!(watchdog.within(now + 120 * second, async {}).await, Some(()));
        assert_eq!(watchdog.within(now + 2 * second, std::future::pending::<()>()).await, None);
        assert_eq!(Instant::now(), now + 2 * second);
        // Work that finishes in time is not cut.
        let now = Instant::now();
        let slow = tokio::time::sleep(5 * second);
        assert_eq!(watchdog.within(now + 6 * second, slow).await, Some(()));
        assert_eq!(Instant::now(), now + 5 * second);
    }

    #[test]
    fn chunked_framing_finds_the_end_however_the_bytes_are_cut() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        assert_eq!(ends(&[body]), Ok(Some(end)));
        for cut in 1..body.len() {
            assert_eq!(ends(&[&body[..cut], &body[cut..]]), Ok(Some(end)), "cut at {cut}");
        }
        let mut chunked = Chunked::default();
        assert_eq!(chunked.feed(&body[..end]), Ok(Some(end)));
        assert_eq!(chunked.data, 11);
        assert_eq!(ends(&[b"0\r\n\r\n"]), Ok(Some(5)));
        assert_eq!(ends(&[b"a\r\n0123456789"]), Ok(None));
    }

    #[test]
    fn malformed_chunked_framing_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"1234567890abcdef0\r\n",
            b"0\r\nbad\nx\r\n\r\n",
            b"0\r\n\rX",
        ] {
            assert_eq!(ends(&[bad]), Err(()), "{:?}", String::from_utf8_lossy(bad));
        }
        let long_extension = [&b"1;"[..], &vec![b'a'; CHUNK_EXTENSION_BYTES_MAX + 1]].concat();
        assert_eq!(ends(&[&long_extension]), Err(()));
    }

    #[test]
    fn request_heads_the_direct_path_leaves_to_the_general_one() {
        let parse = |raw: &'static [u8]| {
            let headers = Box::leak(Box::new([httparse::EMPTY_HEADER; HEADERS_COUNT_MAX]));
            let mut request = httparse::Request::new(headers);
            request.parse(raw).unwrap();
            Head::read(request.headers).map(|head| (head.content_length, head.close))
        };
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Some((0, false)));
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"),
            Some((3, true))
        );
        for refused in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Type: application/grpc\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n",
        ] {
            assert_eq!(parse(refused), None, "{}", String::from_utf8_lossy(refused));
        }
    }
}
