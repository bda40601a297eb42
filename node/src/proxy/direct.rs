//! The direct HTTP/1.1 codec: the common request, carried by one task with no HTTP
//! library between the two sockets.
//!
//! A plain (or TLS, ALPN http/1.1) client connection starts here. Each request's head
//! is parsed in place with `httparse` into the lifecycle's request head (borrowing
//! from the parse buffer); the lifecycle's phases (`lifecycle.rs`) decide everything
//! else. This file only carries bytes: the upstream request is written straight from
//! the client's bytes onto a pooled upstream connection the same task owns, and the
//! upstream's response head is rewritten into the client's buffer and sent with the
//! first body bytes in one write. No boxed body, no channel to a connection task, no
//! second task, and a header map only when a plugin may run or a route matches on
//! headers. nginx works so; the hyper adapter costs about half again as much CPU per
//! request.
//!
//! What this codec carries is narrow on purpose, and everything else is *handed
//! off*: the connection, with every byte read of the request it could not take, goes
//! to the hyper adapter (`general.rs`), which then serves it to the end. A hand-off
//! happens only before anything of the request was sent anywhere or any plugin ran, so
//! the hyper adapter sees the request exactly as the client sent it. Handed off:
//! - a head not complete in the first read (a slow or large client: hyper's timers
//!   and limits apply), or one `httparse` refuses (hostile input gets hyper's exact
//!   answers);
//! - anything but HTTP/1.1 with an origin-form target (h2c's preface, HTTP/1.0,
//!   `CONNECT`, absolute URIs), a target with `#`, or one hyper's URI parser refuses;
//! - `Transfer-Encoding`, `Upgrade`, `Expect`, a duplicate `Host` or
//!   `Content-Length`, a `Connection` naming a framing field, a body not whole in the
//!   buffer (at most [`DIRECT_BODY_BYTES_MAX`]), gRPC;
//! - a config with a global plugin that has a rewrite phase (it needs a header map
//!   before routing); a route whose plugins read the response body (its plan, decided
//!   when the config is compiled); a service that is not plain `http`.
//!
//! The pieces: `request` reads a request head, `response` writes response heads,
//! `chunked` follows chunked framing, `stream` tells when a client is readable
//! without a buffer and carries a handed-off connection, `watchdog` is the
//! connection's one timer; this file is the exchange that ties them together.
//!
//! Plugins run here: the request's headers become a header map for their access
//! phase; the headers they leave for the response are written into the copied head,
//! and when a route's plan has `header_filter` the response head is read into a map for
//! it.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::HOST;
use http::uri::Authority;
use http::{HeaderMap, HeaderValue};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::error::{ErrorKind, ProxyError};
use super::lifecycle::{
    self, Access, Answer, AttemptPlan, Attempted, Forwarded, PluginRun, RequestHead, RequestRule, Stamp, Timeouts,
};
use super::pool::{DirectConn, DirectPool};
use super::router::{strip_port, RequestView};
use super::telemetry::RouteMetrics;
use super::upstream::Transport;
use super::{ClientConn, InFlight, RequestId};

pub(super) mod chunked;
mod request;
pub(super) mod response;
mod stream;
pub(super) mod watchdog;

use chunked::Chunked;
pub use chunked::{CHUNK_EXTENSION_BYTES_MAX, TRAILER_BYTES_MAX};
use request::{header_map, text, Head};
use response::{
    final_head, framing, mapped_response_head, parse_response, put_header, put_number, put_pieces, raw_response_head,
    write_answer, Body,
};
use stream::next_bytes;
pub use stream::{Prefixed, ReadReady};
use watchdog::Watchdog;

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
/// Request headers, in number, the direct path takes: a request with more (up to
/// [`super::HEADERS_COUNT_MAX`]) takes the general path. Clients commonly send about ten;
/// each slot is held, 32 bytes, in every request's exchange, which is moved once
/// onto the heap (a hundred slots were a third of that move).
pub const DIRECT_HEADERS_MAX: usize = 32;
/// Upstream response headers, in number: 502 above.
pub const UPSTREAM_HEADERS_MAX: usize = 100;

/// How a connection left the direct path.
pub enum Outcome {
    /// It is done: closed by either side, failed, or idle past the keep-alive time.
    Closed,
    /// A request this path leaves to the general one: the bytes read from its first
    /// on, none of them answered or sent anywhere.
    HandOff(BytesMut),
}

/// Bytes the response-head buffer starts with when a request arrives.
pub const OUT_BUFFER_BYTES: usize = 1024;

/// Serves `stream`'s requests until it closes or a request is handed off.
pub async fn serve<S>(stream: &mut S, conn: &ClientConn) -> Outcome
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    let keepalive = conn.proxy.timeouts.keepalive;
    // Taken when a request's bytes arrive, given back while the connection idles
    // (nginx's lazy buffers): an idle keep-alive connection holds neither.
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut watchdog = Watchdog::new();
    // A new connection's first request has the header timeout to start; later ones
    // the keep-alive time.
    let mut idle = conn.proxy.timeouts.header;
    loop {
        if buf.is_empty() {
            conn.idle.store(true, std::sync::atomic::Ordering::Relaxed);
            let read = watchdog.within(idle, next_bytes(stream, &mut buf, &mut out)).await;
            conn.idle.store(false, std::sync::atomic::Ordering::Relaxed);
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
        // Boxed: the exchange's state (parsed heads, the upstream attempt) lives only
        // while a request does, not in every idle connection's task.
        match Box::pin(exchange(stream, conn, &buf, &mut out, &mut watchdog)).await {
            Step::Next(used) => buf.advance(used),
            Step::Close => return Outcome::Closed,
            Step::HandOff => {
                conn.proxy.handoffs.increment(1);
                return Outcome::HandOff(buf);
            }
        }
    }
}

/// What one request left the connection to do.
enum Step {
    /// Answered; these bytes of the buffer were the request.
    Next(usize),
    /// Answered (or broken) and the connection closes.
    Close,
    HandOff,
}

/// A request this codec answers: what its answer and its log phase need.
struct Reply<'a> {
    conn: &'a ClientConn,
    started: Instant,
    request_id: RequestId,
    method: &'a str,
    /// The path as the client sent it.
    path: &'a str,
    close: bool,
    /// The bytes of the buffer the request took.
    end: usize,
    ingress: u64,
    metrics: Option<&'a RouteMetrics>,
    /// Counts the request in flight until its answer's head is written.
    in_flight: Option<InFlight<'a>>,
}

impl Reply<'_> {
    fn trace<'t>(&'t self, upstream: Option<&'t str>, upstream_ms: Option<f64>) -> lifecycle::Trace<'t> {
        lifecycle::Trace {
            started: self.started,
            request_id: self.request_id.as_str(),
            method: self.method,
            path: self.path,
            peer: self.conn.peer.ip(),
            tls: self.conn.tls,
            metrics: self.metrics,
            upstream,
            upstream_ms,
        }
    }

    /// The log phase, as of `now`.
    fn finish(
        &self,
        ending: &lifecycle::Ending,
        run: Option<&PluginRun>,
        upstream: (Option<&str>, Option<f64>),
        now: Instant,
    ) {
        let proxy = &*self.conn.proxy;
        let trace = self.trace(upstream.0, upstream.1);
        lifecycle::finish(&trace, ending, run, proxy.access_log.as_ref(), &proxy.plugin_state, now);
        if let Some(metrics) = self.metrics {
            metrics.ingress_bytes.increment(self.ingress);
        }
    }

    /// Sends an answer the proxy or a plugin made, after the log phase.
    async fn made<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        out: &mut Vec<u8>,
        watchdog: &mut Watchdog,
        answer: Answer,
        run: Option<&PluginRun>,
        upstream: (Option<&str>, Option<f64>),
    ) -> Step {
        self.in_flight.take();
        let ending = lifecycle::Ending {
            status: answer.status.as_u16(),
            from_upstream: false,
            response_bytes: Some(answer.body.len() as u64),
        };
        self.finish(&ending, run, upstream, Instant::now());
        // A stopping node closes after this answer.
        let close = self.close || self.conn.closing();
        let sent = write_answer(out, &answer, close, self.method == "HEAD");
        if let Some(metrics) = self.metrics {
            metrics.egress_bytes.increment(sent);
        }
        answered(stream, out, close, self.end, self.conn, watchdog).await
    }

    /// Sends the error's answer (through the response phases of the plugins that ran).
    async fn error<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        out: &mut Vec<u8>,
        watchdog: &mut Watchdog,
        error: ProxyError,
        mut run: Option<&mut PluginRun>,
        upstream: (Option<&str>, Option<f64>),
    ) -> Step {
        tracing::debug!(%error, request_id = self.request_id.as_str(), "request failed");
        let answer = lifecycle::error_answer(&error, run.as_deref_mut(), self.request_id.as_str());
        // Boxed, as every path off the common one: each await's state is room in the
        // exchange's future, which is moved onto the heap for every request.
        Box::pin(self.made(stream, out, watchdog, answer, run.as_deref(), upstream)).await
    }
}

/// Handles the request at the start of `buf`.
async fn exchange<S>(stream: &mut S, conn: &ClientConn, buf: &[u8], out: &mut Vec<u8>, watchdog: &mut Watchdog) -> Step
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let proxy = &*conn.proxy;
    let started = Instant::now();
    // Uninitialised: filling 100 empty headers per request costs more than parsing.
    let mut headers = [const { MaybeUninit::uninit() }; DIRECT_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut []);
    let Ok(httparse::Status::Complete(head_len)) = request.parse_with_uninit_headers(buf, &mut headers) else {
        return Step::HandOff;
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version) else {
        return Step::HandOff;
    };
    if !target.starts_with('/') || target.contains('#') || method == "CONNECT" {
        return Step::HandOff;
    }
    // Only targets hyper's URI parser takes: it refuses some that httparse lets
    // through (`<`, `>`, a backtick), and answers them itself.
    if !request::uri_surely_valid(target) && http::uri::PathAndQuery::try_from(target).is_err() {
        return Step::HandOff;
    }
    let headers = request.headers;
    let Some(mut head) = Head::read(headers) else { return Step::HandOff };
    let request_end = head_len + head.content_length;
    if request_end > buf.len() {
        return Step::HandOff;
    }
    let (raw_path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let request = RequestHead {
        method,
        path: raw_path,
        query,
        target_len: target.len(),
        host: head.host,
        forwarded_for: head.forwarded_for.take(),
        content_length: head.declared.then_some(head.content_length as u64),
        tls: conn.tls,
        grpc: false,
    };
    let compiled = proxy.published.load();
    let snapshot = &compiled.proxy;
    // A global rewrite phase needs a header map before routing.
    if snapshot.plugins.rewrites() {
        return Step::HandOff;
    }
    let mut reply = Reply {
        conn,
        started,
        request_id: proxy.next_request_id(),
        method,
        path: raw_path,
        close: head.close,
        end: request_end,
        ingress: head.content_length as u64,
        metrics: snapshot.unmatched_metrics.as_deref(),
        in_flight: None,
    };

    // admit → route
    let path = match lifecycle::admit(&request) {
        Ok(path) => path,
        Err(error) => {
            proxy.direct_requests.increment(1);
            reply.in_flight = Some(InFlight::new(&proxy.load));
            return reply.error(stream, out, watchdog, error, None, (None, None)).await;
        }
    };
    // A header map only for what reads one: plugins, or routes matching on headers.
    let mut map = snapshot.router.reads_headers().then(|| header_map(headers, &buf[..head_len]));
    let empty = HeaderMap::new();
    let routed = {
        let host = request.host_lower();
        let headers = map.as_ref().unwrap_or(&empty);
        let view = RequestView { method, host: &host, path: &path, headers, protocol: request.scheme() };
        lifecycle::route(snapshot, &view)
    };
    let routed = match routed {
        Ok(routed) => routed,
        Err(error) => {
            proxy.direct_requests.increment(1);
            reply.in_flight = Some(InFlight::new(&proxy.load));
            return reply.error(stream, out, watchdog, error, None, (None, None)).await;
        }
    };
    // What this codec carries: plain `http` upstreams, and no plugin that reads the
    // response body.
    if routed.service.is_some_and(|service| service.enabled && !matches!(service.transport, Transport::Http1))
        || routed.plan.phases.response_body
    {
        return Step::HandOff;
    }
    let http_method = match routed.plan.may_run {
        true => match http::Method::from_bytes(method.as_bytes()) {
            Ok(method) => Some(method),
            Err(_) => return Step::HandOff,
        },
        false => None,
    };
    if routed.plan.may_run && map.is_none() {
        map = Some(header_map(headers, &buf[..head_len]));
    }

    // From here on the request is this codec's: it is answered whatever happens.
    // (Counted now, before its answer can reach the client.)
    proxy.direct_requests.increment(1);
    reply.in_flight = Some(InFlight::new(&proxy.load));
    reply.metrics = routed.metrics.map(|metrics| &**metrics);
    let named = |name: &str| headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).and_then(|h| text(h.value));
    let client_ip = lifecycle::client_ip(&proxy.trusted_ips, conn.peer.ip(), request.forwarded_for.as_deref(), named);

    // access, with the body at hand for plugins that read it
    let mut body = Bytes::new();
    // Boxed: held across every await of the exchange, and most routes run no plugin.
    let mut run: Option<Box<PluginRun>> = None;
    if let (Some(map), Some(http_method)) = (map.as_mut(), &http_method) {
        let sent = Bytes::copy_from_slice(&buf[head_len..request_end]);
        let mut whole = Some(http_body_util::Full::new(sent.clone()));
        let state = &proxy.plugin_state;
        // Boxed (as `Reply::error`): the plugins' futures are kilobytes.
        let access =
            lifecycle::access(snapshot, &routed, &request, &path, client_ip, http_method, map, &mut whole, state);
        match Box::pin(access).await {
            Access::Exit(mut exited, exit) => {
                let answer = lifecycle::exit_answer(exit, &mut exited, reply.request_id.as_str());
                return Box::pin(reply.made(stream, out, watchdog, answer, Some(&exited), (None, None))).await;
            }
            Access::Continue(continued) => run = continued.map(Box::new),
        }
        // A plugin that read the body (and may have changed it) sends it as it is now,
        // with its length (set with the other headers below).
        body = run.as_deref_mut().and_then(|run| run.ctx.request_body.take()).unwrap_or(sent);
        if body.len() as u64 > lifecycle::body_limit(run.as_deref()) {
            let error = ErrorKind::BodyLimitExceeded.into();
            return reply.error(stream, out, watchdog, error, run.as_deref_mut(), (None, None)).await;
        }
    }

    // upstream head
    let service = match routed.service() {
        Ok(service) => service,
        Err(error) => return reply.error(stream, out, watchdog, error, run.as_deref_mut(), (None, None)).await,
    };
    let target = match lifecycle::upstream_target(service, &routed, &path, query, run.as_deref()) {
        Ok(target) => target,
        Err(error) => return reply.error(stream, out, watchdog, error, run.as_deref_mut(), (None, None)).await,
    };
    let replaced_method = run.as_deref().and_then(|run| run.ctx.upstream_method.clone());
    let upstream_method = replaced_method.as_ref().map_or(method, http::Method::as_str);
    out.clear();
    out.extend_from_slice(upstream_method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let peer_ip = conn.peer.ip();
    let real_ip = if client_ip == peer_ip {
        Cow::Borrowed(conn.peer_ip.as_bytes())
    } else {
        Cow::Owned(client_ip.to_string().into_bytes())
    };
    let mut forwarding = lifecycle::Forwarding {
        peer_trusted: proxy.trusted_ips.contains(peer_ip),
        forwarded_for: request.forwarded_for.as_deref(),
        peer_ip: conn.peer_ip.as_bytes(),
        real_ip,
        tls: conn.tls,
        host: Some(strip_port(head.host)),
        port: conn.local_port.as_bytes(),
        path: raw_path,
        prefix: routed.stripped_prefix(&path),
        request_id: reply.request_id.as_str(),
        upstream_host: None,
    };
    let service_host = service.host_header.as_ref().map(HeaderValue::as_bytes);
    match map.as_mut().filter(|_| run.is_some()) {
        Some(map) => {
            // The headers as the plugins left them; hop-by-hop fields a plugin set go.
            lifecycle::remove_hop_by_hop(map);
            let client_host = map.get(HOST).cloned();
            let client_host = client_host.as_ref().and_then(|host| host.to_str().ok());
            forwarding.host = client_host.map(strip_port);
            forwarding.upstream_host = match (routed.route.preserve_host, client_host) {
                (true, Some(host)) => Some(host.as_bytes()),
                _ => service_host,
            };
            // Written as `apply` would leave the map, without making its values. (The
            // map stays the client's as the plugins left it, which is what the
            // balancer hashes, as on the path without plugins.)
            forwarding.write(map, |name, pieces| put_pieces(out, name.as_bytes(), pieces));
            // The body's length is ours to say, never a header the client sent.
            if head.declared || !body.is_empty() {
                out.extend_from_slice(b"content-length: ");
                put_number(out, body.len() as u64);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&body);
        }
        None => {
            forwarding.upstream_host = match routed.route.preserve_host {
                true => Some(head.host.as_bytes()),
                false => service_host.or(Some(head.host.as_bytes())),
            };
            for (header, rule) in headers.iter().zip(head.rules) {
                let keep = match rule {
                    RequestRule::Keep => true,
                    RequestRule::Forwarded(which) => which != Forwarded::For && forwarding.peer_trusted,
                    _ => false,
                };
                if keep {
                    put_header(out, header.name.as_bytes(), header.value);
                }
            }
            forwarding.each(|which| head.sent(which), |field, pieces| put_pieces(out, field.name().as_bytes(), pieces));
            if head.declared {
                out.extend_from_slice(b"content-length: ");
                put_number(out, head.content_length as u64);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&buf[head_len..request_end]);
        }
    }

    // attempts
    let balancer_headers;
    let balance_map = match (service.balancer.as_deref(), &map) {
        (_, Some(map)) => map,
        (Some(balancer), None) if balancer.balancer.reads_headers() => {
            balancer_headers = header_map(headers, &buf[..head_len]);
            &balancer_headers
        }
        _ => &empty,
    };
    let plan = AttemptPlan {
        service,
        key: super::balancer::BalanceKey { client_ip, headers: balance_map, path: &path, query },
        health: &proxy.health,
        // The body is at hand: the request can be sent again.
        replayable: true,
        idempotent: lifecycle::idempotent(upstream_method),
        label: proxy.access_log.is_some(),
    };
    let pool = &proxy.clients.direct;
    let mut attempted = Attempted { upstream_started: Instant::now(), label: None };
    let sent = {
        let mut upstream =
            DirectUpstream { pool, request: &out[..], watchdog: &mut *watchdog, timeouts: service.timeouts };
        lifecycle::attempts(&plan, &mut upstream, &mut attempted).await
    };
    let label = attempted.label.as_deref();
    let exchange = match sent {
        Ok(exchange) => exchange,
        Err(error) => return reply.error(stream, out, watchdog, error, run.as_deref_mut(), (label, None)).await,
    };
    let Exchange { mut connection, head_len: response_head_len, status, authority } = exchange;
    let answered_at = Instant::now();
    let upstream_elapsed = answered_at.duration_since(attempted.upstream_started);
    let upstream_ms = upstream_elapsed.as_millis() as u64;
    let proxy_ms = (answered_at.duration_since(started).as_millis() as u64).saturating_sub(upstream_ms);
    let upstream_ms_f = Some(upstream_elapsed.as_secs_f64() * 1e3);

    // response head
    let framing = {
        let mut response_headers = [const { MaybeUninit::uninit() }; UPSTREAM_HEADERS_MAX];
        let mut response = httparse::Response::new(&mut []);
        let parsed = parse_response(&mut response, &connection.buf, &mut response_headers);
        match (parsed, framing(&response, upstream_method, head.close || conn.closing())) {
            // The head `read_head` found, to its end.
            (Ok(httparse::Status::Complete(len)), Some(framing)) if len == response_head_len => {
                let stamp = Stamp { request_id: reply.request_id.as_str(), upstream_ms, proxy_ms };
                match run.as_deref_mut() {
                    Some(run) if routed.plan.phases.header_filter => {
                        mapped_response_head(out, &response, &framing, &stamp, run);
                    }
                    run => {
                        let added = run.map_or(&[][..], |run| &run.ctx.response_headers[..]);
                        raw_response_head(out, &response, &framing, &stamp, added);
                    }
                }
                Some(framing)
            }
            _ => None,
        }
    };
    let Some(framing) = framing else {
        let error = ErrorKind::UpstreamInvalid.into();
        return reply.error(stream, out, watchdog, error, run.as_deref_mut(), (label, upstream_ms_f)).await;
    };
    reply.in_flight.take();
    let ending = lifecycle::Ending { status, from_upstream: true, response_bytes: framing.content_length };
    reply.finish(&ending, run.as_deref(), (label, upstream_ms_f), answered_at);

    // the body, relayed in its own framing
    let timeouts = (service.timeouts.read, proxy.timeouts.send);
    let relayed = relay(stream, &mut connection, response_head_len, framing.body, out, timeouts, watchdog).await;
    if let Some(metrics) = reply.metrics {
        metrics.egress_bytes.increment(relayed.body_bytes);
    }
    if relayed.upstream_reusable && framing.upstream_keepalive {
        pool.put(&authority, connection, answered_at);
    }
    if !relayed.client_ok || framing.close_client {
        return Step::Close;
    }
    Step::Next(request_end)
}

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

/// An upstream response head, whole at the start of the connection's buffer.
pub(super) struct Exchange {
    pub(super) connection: DirectConn,
    pub(super) head_len: usize,
    pub(super) status: u16,
    pub(super) authority: Authority,
}

/// The direct codec's side of [`lifecycle::Upstream`] (and the general path's, for a
/// plain `http` upstream): the request already written in `request`, sent on the
/// worker's own pool.
pub(super) struct DirectUpstream<'a> {
    pub(super) pool: &'a DirectPool,
    pub(super) request: &'a [u8],
    pub(super) watchdog: &'a mut Watchdog,
    pub(super) timeouts: Timeouts,
}

impl lifecycle::Upstream for DirectUpstream<'_> {
    type Answer = Exchange;

    fn status(answer: &Exchange) -> u16 {
        answer.status
    }

    async fn send(&mut self, authority: &Authority, fresh: bool) -> Result<Exchange, ProxyError> {
        let now = Instant::now();
        let pooled = if fresh { None } else { self.pool.checkout(authority, now) };
        let mut connection = match pooled {
            Some(connection) => connection,
            // Boxed: connecting (hyper-util's connector) takes 3 KB of state, which
            // every request's exchange would otherwise hold room for.
            None => match self.watchdog.within(self.timeouts.connect, Box::pin(self.pool.connect(authority))).await {
                Some(Ok(connection)) => connection,
                Some(Err(failure)) => {
                    return Err(ProxyError::caused_by(ErrorKind::UpstreamUnreachable, failure).retryable(true))
                }
                None => return Err(ErrorKind::UpstreamTimeout.into()),
            },
        };
        // Nothing of an answer came: on a reused connection the upstream may have
        // closed it while idle.
        let unanswered = |reused: bool, failure: std::io::Error| {
            let kind = if reused { ErrorKind::UpstreamClosed } else { ErrorKind::UpstreamInvalid };
            ProxyError::caused_by(kind, failure.into()).retryable(reused)
        };
        let reused = connection.reused;
        match self.watchdog.write(&mut connection.stream, self.request, self.timeouts.write).await {
            Ok(()) => {}
            Err(None) => return Err(ErrorKind::UpstreamTimeout.into()),
            Err(Some(failure)) => return Err(unanswered(reused, failure)),
        }
        match read_head(&mut connection, self.watchdog, self.timeouts.read).await {
            Ok((head_len, status)) => Ok(Exchange { connection, head_len, status, authority: authority.clone() }),
            Err(HeadFailure::TimedOut) => Err(ErrorKind::UpstreamTimeout.into()),
            Err(HeadFailure::Switched) => Err(ErrorKind::UpstreamSwitchedUnasked.into()),
            Err(HeadFailure::Unanswered(failure)) => Err(unanswered(reused, failure)),
            Err(HeadFailure::Broken(failure)) => Err(ProxyError::caused_by(ErrorKind::UpstreamInvalid, failure.into())),
        }
    }
}

enum HeadFailure {
    /// The connection failed before a byte of the response arrived.
    Unanswered(std::io::Error),
    Broken(std::io::Error),
    /// A read made no progress for the read timeout.
    TimedOut,
    /// 101 to a request that asked for no upgrade.
    Switched,
}

/// Reads until a final response head is whole in the connection's buffer (interim
/// 1xx answers other than 101 are skipped), each read within `read_timeout`.
async fn read_head(
    connection: &mut DirectConn,
    watchdog: &mut Watchdog,
    read_timeout: Duration,
) -> Result<(usize, u16), HeadFailure> {
    let invalid =
        |what: &str| HeadFailure::Broken(std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()));
    let mut answered = false;
    loop {
        if !connection.buf.is_empty() {
            if let Some(found) = final_head(&connection.buf) {
                return Ok(found);
            }
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
                        return Err(HeadFailure::Switched);
                    }
                    return Ok((head_len, code));
                }
                Ok(httparse::Status::Partial) if connection.buf.len() < UPSTREAM_HEAD_BYTES_MAX => {}
                Ok(httparse::Status::Partial) => return Err(invalid("upstream response head too large")),
                Err(error) => return Err(invalid(&error.to_string())),
            }
        }
        connection.buf.reserve(UPSTREAM_READ_BYTES);
        let read = connection.stream.read_buf(&mut connection.buf);
        match watchdog.within(read_timeout, read).await {
            None => return Err(HeadFailure::TimedOut),
            Some(Ok(0)) if !answered => {
                return Err(HeadFailure::Unanswered(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Some(Ok(0)) => return Err(HeadFailure::Broken(std::io::ErrorKind::UnexpectedEof.into())),
            Some(Ok(_)) => answered = true,
            Some(Err(error)) if !answered => return Err(HeadFailure::Unanswered(error)),
            Some(Err(error)) => return Err(HeadFailure::Broken(error)),
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
        match watchdog.within(read_timeout, read).await {
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
