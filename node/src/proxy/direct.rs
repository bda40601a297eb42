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
//! Plugins run here: the request's headers become a header map for their access
//! phase; the headers they leave for the response are written into the copied head,
//! and when a route's plan has `header_filter` the response head is read into a map for
//! it.

use std::borrow::Cow;
use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::error::{ErrorKind, ProxyError};
use super::lifecycle::{
    self, Access, Answer, AttemptPlan, Attempted, Forwarded, PluginRun, RequestHead, RequestRule, ResponseRule, Stamp,
    Stamped, Timeouts,
};
use super::pool::{DirectConn, DirectPool};
use super::router::{strip_port, RequestView};
use super::telemetry::RouteMetrics;
use super::upstream::Transport;
use super::{ClientConn, InFlight, RequestId};

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
/// [`super::HEADERS_COUNT_MAX`]) takes the general path. Kong's clients send about ten;
/// each slot is held, 32 bytes, in every request's exchange, which is moved once
/// onto the heap (a hundred slots were a third of that move).
pub const DIRECT_HEADERS_MAX: usize = 32;
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

/// Bytes the response-head buffer starts with when a request arrives.
pub const OUT_BUFFER_BYTES: usize = 1024;

/// A client stream that can tell when a read would find bytes without being handed a
/// buffer to read them into, so that an idle connection holds none.
pub trait ReadReady {
    /// Whether [`ReadReady::poll_readable`] can tell at all (the simulator's streams
    /// cannot: a connection on one waits in its read, buffers held).
    fn tells_readable(&self) -> bool;

    /// Ready when a read would not wait (bytes, the end, or an error); it may be
    /// ready when a read still waits, never the other way round.
    fn poll_readable(&mut self, context: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

impl ReadReady for crate::env::Stream {
    fn tells_readable(&self) -> bool {
        matches!(self, crate::env::Stream::Tcp(_))
    }

    fn poll_readable(&mut self, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            crate::env::Stream::Tcp(stream) => stream.poll_read_ready(context),
            crate::env::Stream::Other(_) => Poll::Ready(Ok(())),
        }
    }
}

impl<S: ReadReady> ReadReady for tokio_rustls::server::TlsStream<S> {
    fn tells_readable(&self) -> bool {
        self.get_ref().0.tells_readable()
    }

    fn poll_readable(&mut self, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let (io, session) = self.get_mut();
        // Plaintext already decrypted (or the peer's close_notify): a read answers now.
        if !session.wants_read() {
            return Poll::Ready(Ok(()));
        }
        io.poll_readable(context)
    }
}

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

/// Reads a connection's next bytes into `buf` (empty): at once into the buffers the
/// last request left when the bytes are already there; otherwise both buffers are
/// given back, and taken again once the stream is readable.
async fn next_bytes<S>(stream: &mut S, buf: &mut BytesMut, out: &mut Vec<u8>) -> std::io::Result<usize>
where
    S: AsyncRead + ReadReady + Unpin,
{
    loop {
        if buf.capacity() > 0 {
            // Reclaims the whole buffer (it is empty), so a request head fits again.
            buf.reserve(CLIENT_BUFFER_BYTES);
            let mut read = std::pin::pin!(stream.read_buf(buf));
            let now = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
            if let Poll::Ready(read) = now {
                return read;
            }
        }
        if !stream.tells_readable() {
            // Waiting for readiness would be ready at once, every time: wait in the
            // read instead.
            buf.reserve(CLIENT_BUFFER_BYTES);
            out.reserve(OUT_BUFFER_BYTES);
            return stream.read_buf(buf).await;
        }
        *buf = BytesMut::new();
        *out = Vec::new();
        std::future::poll_fn(|cx| stream.poll_readable(cx)).await?;
        buf.reserve(CLIENT_BUFFER_BYTES);
        out.reserve(OUT_BUFFER_BYTES);
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

/// Visible ASCII and spaces only: what `HeaderValue::to_str` accepts.
fn text(value: &[u8]) -> Option<&str> {
    value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)).then(|| std::str::from_utf8(value).ok()).flatten()
}

/// The comma-separated tokens of a `Connection` value.
fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(|token| token.trim_matches([' ', '\t'])).filter(|token| !token.is_empty())
}

/// Request headers this codec does not carry (the hyper adapter does): `Expect`
/// (100-continue), `Upgrade` (a tunnel), `Transfer-Encoding` (a streamed body), `TE`
/// (trailers asked for).
fn refused_by_codec(name: &str) -> bool {
    let is = |wanted: &str| name.eq_ignore_ascii_case(wanted);
    match name.len() {
        2 => is("te"),
        6 => is("expect"),
        7 => is("upgrade"),
        17 => is("transfer-encoding"),
        _ => false,
    }
}

/// What the request's headers say, read in one pass; `None` to hand it off.
struct Head<'a> {
    /// The lifecycle's rule for each header, by position (`Drop` for those the
    /// client's `Connection` names).
    rules: [RequestRule; DIRECT_HEADERS_MAX],
    content_length: usize,
    /// The client sent a `Content-Length`.
    declared: bool,
    host: &'a str,
    /// The client asked to close after this request.
    close: bool,
    /// The `X-Forwarded-For` lines left after removing what `Connection` names,
    /// joined (`None` when one is not text).
    forwarded_for: Option<Cow<'a, str>>,
    /// Which `X-Forwarded-*` headers are left.
    forwarded: [bool; 6],
}

impl<'a> Head<'a> {
    fn read(headers: &'a [httparse::Header<'a>]) -> Option<Head<'a>> {
        let mut head = Head {
            rules: [RequestRule::Keep; DIRECT_HEADERS_MAX],
            content_length: 0,
            declared: false,
            host: "",
            close: false,
            forwarded_for: None,
            forwarded: [false; 6],
        };
        let mut named: Vec<&str> = Vec::new();
        let (mut host, mut length) = (None, None);
        for (index, header) in headers.iter().enumerate() {
            if refused_by_codec(header.name) {
                return None;
            }
            let rule = lifecycle::request_rule(header.name);
            // No more than the parse had room for; a panic reachable from the network
            // is not an option whatever the caller passes.
            *head.rules.get_mut(index)? = rule;
            match rule {
                RequestRule::Drop if header.name.eq_ignore_ascii_case("connection") => {
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
                RequestRule::Host if host.is_none() => host = Some(text(header.value)?),
                RequestRule::Length if length.is_none() => {
                    let value = text(header.value)?;
                    let parsed: usize = value.parse().ok().filter(|_| value.bytes().all(|b| b.is_ascii_digit()))?;
                    length = Some(parsed);
                }
                RequestRule::Host | RequestRule::Length => return None,
                RequestRule::Keep
                    if header.name.eq_ignore_ascii_case("content-type")
                        && header.value.starts_with(b"application/grpc") =>
                {
                    return None
                }
                _ => {}
            }
        }
        head.host = host?;
        head.declared = length.is_some();
        head.content_length = length.unwrap_or(0);
        if head.content_length > DIRECT_BODY_BYTES_MAX {
            return None;
        }
        let mut forwarded_for = ForwardedFor::default();
        for (index, header) in headers.iter().enumerate() {
            if !named.is_empty() && named.iter().any(|name| name.eq_ignore_ascii_case(header.name)) {
                head.rules[index] = RequestRule::Drop;
                continue;
            }
            if let RequestRule::Forwarded(which) = head.rules[index] {
                head.forwarded[which as usize] = true;
                if which == Forwarded::For {
                    forwarded_for.add(header.value);
                }
            }
        }
        head.forwarded_for = forwarded_for.chain();
        Some(head)
    }

    /// Whether the client's request (what `Connection` names gone) has this header.
    fn sent(&self, which: Forwarded) -> bool {
        self.forwarded[which as usize]
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
/// (as the hyper adapter has it before plugins run). `head` is the buffer they were
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
    lifecycle::remove_hop_by_hop(&mut map);
    map
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
        self.made(stream, out, watchdog, answer, run.as_deref(), upstream).await
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
    if http::uri::PathAndQuery::try_from(target).is_err() {
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
    let mut run: Option<PluginRun> = None;
    if let (Some(map), Some(http_method)) = (map.as_mut(), &http_method) {
        let sent = Bytes::copy_from_slice(&buf[head_len..request_end]);
        let mut whole = Some(http_body_util::Full::new(sent.clone()));
        let state = &proxy.plugin_state;
        match lifecycle::access(snapshot, &routed, &request, &path, client_ip, http_method, map, &mut whole, state)
            .await
        {
            Access::Exit(mut exited, exit) => {
                let answer = lifecycle::exit_answer(exit, &mut exited, reply.request_id.as_str());
                return reply.made(stream, out, watchdog, answer, Some(&exited), (None, None)).await;
            }
            Access::Continue(continued) => run = continued,
        }
        // A plugin that read the body (and may have changed it) sends it as it is now,
        // with its length (set with the other headers below).
        body = run.as_mut().and_then(|run| run.ctx.request_body.take()).unwrap_or(sent);
        if body.len() as u64 > lifecycle::body_limit(run.as_ref()) {
            let error = ErrorKind::BodyLimitExceeded.into();
            return reply.error(stream, out, watchdog, error, run.as_mut(), (None, None)).await;
        }
    }

    // upstream head
    let service = match routed.service() {
        Ok(service) => service,
        Err(error) => return reply.error(stream, out, watchdog, error, run.as_mut(), (None, None)).await,
    };
    let target = match lifecycle::upstream_target(service, &routed, &path, query, run.as_ref()) {
        Ok(target) => target,
        Err(error) => return reply.error(stream, out, watchdog, error, run.as_mut(), (None, None)).await,
    };
    let replaced_method = run.as_ref().and_then(|run| run.ctx.upstream_method.clone());
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
            forwarding.apply(map);
            // The body's length is ours to say, never a header the client sent.
            map.remove(CONTENT_LENGTH);
            if head.declared || !body.is_empty() {
                map.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            }
            for (name, value) in map.iter() {
                put_header(out, name.as_str().as_bytes(), value.as_bytes());
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
            forwarding.each(
                |which| head.sent(which),
                |name, pieces| {
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(b": ");
                    for piece in pieces {
                        out.extend_from_slice(piece);
                    }
                    out.extend_from_slice(b"\r\n");
                },
            );
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
        Err(error) => return reply.error(stream, out, watchdog, error, run.as_mut(), (label, None)).await,
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
            (Ok(httparse::Status::Complete(_)), Some(framing)) => {
                let stamp = Stamp { request_id: reply.request_id.as_str(), upstream_ms, proxy_ms };
                match run.as_mut() {
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
        return reply.error(stream, out, watchdog, error, run.as_mut(), (label, upstream_ms_f)).await;
    };
    reply.in_flight.take();
    let ending = lifecycle::Ending { status, from_upstream: true, response_bytes: framing.content_length };
    reply.finish(&ending, run.as_ref(), (label, upstream_ms_f), answered_at);

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
/// to pass on (502): unparseable lengths, or lengths that disagree
/// ([`lifecycle::check_response_lengths`], as the hyper adapter checks them).
fn framing(response: &httparse::Response<'_, '_>, method: &str, client_close: bool) -> Option<Framing> {
    // Below 100 is no HTTP status (hyper's client refuses it too).
    let code = response.code.filter(|code| *code >= 100)?;
    let mut keepalive = response.version == Some(1);
    let (mut chunked, mut encoded, mut dated) = (false, false, false);
    let lengths = response.headers.iter().filter(|header| header.name.eq_ignore_ascii_case("content-length"));
    let length = lifecycle::check_response_lengths(lengths.map(|header| header.value)).ok()?;
    for header in response.headers.iter() {
        let is = |wanted: &str| header.name.eq_ignore_ascii_case(wanted);
        if is("transfer-encoding") {
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

/// The status line of the client's answer.
fn status_line(out: &mut Vec<u8>, code: u16, reason: &str) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    put_number(out, u64::from(code));
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes the client's response head into `out` from the upstream's parsed head,
/// without a header map: what the lifecycle's response head ([`Stamp::apply`], then
/// the headers plugins left, each replacing any of its name) makes of it.
fn raw_response_head(
    out: &mut Vec<u8>,
    response: &httparse::Response<'_, '_>,
    framing: &Framing,
    stamp: &Stamp<'_>,
    added: &[(http::HeaderName, HeaderValue)],
) {
    let mut named: Vec<&str> = Vec::new();
    for header in response.headers.iter().filter(|header| header.name.eq_ignore_ascii_case("connection")) {
        named.extend(text(header.value).into_iter().flat_map(tokens));
    }
    let replaced_by_plugin = |name: &str| added.iter().any(|(added, _)| added.as_str().eq_ignore_ascii_case(name));
    status_line(out, response.code.unwrap_or_default(), response.reason.unwrap_or_default());
    for header in response.headers.iter() {
        let name = header.name;
        if lifecycle::response_rule(name) != ResponseRule::Keep
            || (!added.is_empty() && replaced_by_plugin(name))
            || named.iter().any(|token| token.eq_ignore_ascii_case(name))
        {
            continue;
        }
        put_header(out, name.as_bytes(), header.value);
    }
    stamp.each(|name, value| {
        if replaced_by_plugin(name) {
            return;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        match value {
            Stamped::Text(text) => out.extend_from_slice(text),
            Stamped::Number(number) => put_number(out, number),
        }
        out.extend_from_slice(b"\r\n");
    });
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

/// The same through a header map, for a route whose plugins have `header_filter`.
fn mapped_response_head(
    out: &mut Vec<u8>,
    response: &httparse::Response<'_, '_>,
    framing: &Framing,
    stamp: &Stamp<'_>,
    run: &mut PluginRun,
) {
    let mut headers = HeaderMap::with_capacity(response.headers.len() + 8);
    for header in response.headers.iter() {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(header.name.as_bytes()), HeaderValue::from_bytes(header.value))
        {
            headers.append(name, value);
        }
    }
    stamp.apply(&mut headers);
    let status = StatusCode::from_u16(response.code.unwrap_or_default()).unwrap_or(StatusCode::BAD_GATEWAY);
    lifecycle::header_filter(Some(run), status, &mut headers);
    status_line(out, status.as_u16(), response.reason.unwrap_or_default());
    for (name, value) in &headers {
        if lifecycle::response_rule(name.as_str()) == ResponseRule::Keep {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    let dated = headers.contains_key(http::header::DATE);
    framing_headers(out, framing.body, framing.content_length, framing.close_client, dated);
}

/// Writes an answer the proxy or a plugin made; returns the bytes of body written
/// (none in answer to `HEAD`, which keeps the length, as hyper does).
fn write_answer(out: &mut Vec<u8>, answer: &Answer, close: bool, head: bool) -> u64 {
    status_line(out, answer.status.as_u16(), answer.status.canonical_reason().unwrap_or_default());
    for (name, value) in &answer.headers {
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let dated = answer.headers.contains_key(http::header::DATE);
    framing_headers(out, Body::Length(answer.body.len() as u64), Some(answer.body.len() as u64), close, dated);
    if head {
        return 0;
    }
    out.extend_from_slice(&answer.body);
    answer.body.len() as u64
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
        put_header(out, b"date", httpdate::fmt_http_date(crate::clock::wall_time()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// An upstream response head, whole at the start of the connection's buffer.
struct Exchange {
    connection: DirectConn,
    head_len: usize,
    status: u16,
    authority: Authority,
}

/// The direct codec's side of [`lifecycle::Upstream`]: the request already written
/// in `request`, sent on the worker's own pool.
struct DirectUpstream<'a> {
    pool: &'a DirectPool,
    request: &'a [u8],
    watchdog: &'a mut Watchdog,
    timeouts: Timeouts,
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
            None => match self.watchdog.within(self.timeouts.connect, self.pool.connect(authority)).await {
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

/// One timer per client connection for every deadline of its requests: the idle
/// keep-alive wait, connecting, each write and read of the upstream exchange, each
/// write to the client. Arming a tokio timer per wait (`tokio::time::timeout`) costs a
/// timer-wheel insertion and removal each time; this one stays armed, and moves only
/// when it fires before the deadline in force (it then checks the time and re-arms)
/// or when a deadline earlier than its own comes. With the usual deadlines (tens of
/// seconds) it moves about once per keep-alive period, not per request.
struct Watchdog {
    sleep: Pin<Box<Sleep>>,
}

impl Watchdog {
    fn new() -> Watchdog {
        Watchdog { sleep: Box::pin(tokio::time::sleep(Duration::ZERO)) }
    }

    /// Writes all of `bytes` to `stream` unless a write makes no progress for
    /// `timeout`: `Err(None)` then, `Err(Some(_))` when a write fails.
    async fn write<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<(), Option<std::io::Error>> {
        let mut sent = 0;
        while sent < bytes.len() {
            match self.within(timeout, stream.write(&bytes[sent..])).await {
                Some(Ok(0)) => return Err(Some(std::io::ErrorKind::WriteZero.into())),
                Some(Err(error)) => return Err(Some(error)),
                Some(Ok(written)) => sent += written,
                None => return Err(None),
            }
        }
        Ok(())
    }

    /// Writes to the client (the send timeout, nginx's `send_timeout`); whether it was
    /// all written.
    async fn send<S: AsyncWrite + Unpin>(&mut self, stream: &mut S, bytes: &[u8], timeout: Duration) -> bool {
        match self.write(stream, bytes, timeout).await {
            Ok(()) => true,
            Err(Some(_)) => false,
            Err(None) => {
                metrics::counter!("tollgate_proxy_timeouts_total", "kind" => "send").increment(1);
                false
            }
        }
    }

    /// Runs `work` for at most `timeout` from when it first has to wait; `None` when
    /// the time ran out first. The clock is read only then: most writes, and reads whose
    /// bytes are already there, finish at once and read none (a clock read is a few
    /// percent of a request's user time, and a request had eight).
    async fn within<F: Future>(&mut self, timeout: Duration, work: F) -> Option<F::Output> {
        let mut work = std::pin::pin!(work);
        let mut armed = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            let deadline = *armed.get_or_insert_with(|| {
                let deadline = Instant::now() + timeout;
                if self.sleep.deadline() > deadline {
                    self.sleep.as_mut().reset(deadline);
                }
                deadline
            });
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

    /// An idle connection holds no buffers (`next_bytes` gives both back while the
    /// read waits); one whose bytes are already there reads them into the buffers it
    /// holds, without taking new ones.
    #[tokio::test]
    async fn an_idle_connection_gives_its_buffers_back_and_a_busy_one_keeps_them() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let mut server = crate::env::Stream::Tcp(listener.accept().await.unwrap().0);
        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

        // As the last request left them; nothing more sent yet.
        let mut buf = BytesMut::with_capacity(CLIENT_BUFFER_BYTES);
        let mut out = Vec::with_capacity(OUT_BUFFER_BYTES);
        {
            let mut reading = std::pin::pin!(next_bytes(&mut server, &mut buf, &mut out));
            let waits = std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx).is_pending())).await;
            assert!(waits);
        }
        assert_eq!((buf.capacity(), out.capacity()), (0, 0));

        // Bytes arrive: both are taken again, and the bytes read.
        client.write_all(request).await.unwrap();
        assert_eq!(next_bytes(&mut server, &mut buf, &mut out).await.unwrap(), request.len());
        assert_eq!(&buf[..], request);
        assert!(buf.capacity() >= CLIENT_BUFFER_BYTES && out.capacity() >= OUT_BUFFER_BYTES);

        // The next request is there by the time the last answer went out: read into
        // the same buffer.
        buf.advance(request.len());
        let held = buf.as_ptr() as usize - request.len();
        client.write_all(request).await.unwrap();
        std::future::poll_fn(|cx| server.poll_readable(cx)).await.unwrap();
        assert_eq!(next_bytes(&mut server, &mut buf, &mut out).await.unwrap(), request.len());
        assert_eq!((&buf[..], buf.as_ptr() as usize), (&request[..], held));
    }

    /// A stream that cannot tell when it is readable (the simulator's) waits in its
    /// read. It used to spin: readiness "ready" at once, the read pending, again,
    /// without ever yielding, and the simulated node hung.
    #[test]
    fn a_stream_that_cannot_tell_readiness_waits_in_its_read() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                use tokio::io::AsyncWriteExt;
                let (mut client, server) = tokio::io::duplex(64 * 1024);
                let mut server = crate::env::Stream::Other(Box::new(server));
                let (mut buf, mut out) = (BytesMut::new(), Vec::new());
                let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
                let (waits, read) = {
                    let mut reading = std::pin::pin!(next_bytes(&mut server, &mut buf, &mut out));
                    let waits = std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx).is_pending())).await;
                    client.write_all(request).await.unwrap();
                    (waits, reading.await.unwrap())
                };
                let _ = done.send((waits, read == request.len() && buf.capacity() >= CLIENT_BUFFER_BYTES));
            });
        });
        let outcome = finished.recv_timeout(Duration::from_secs(30)).expect("next_bytes never yielded: it spins");
        assert_eq!(outcome, (true, true));
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_holds_every_deadline_whatever_it_was_armed_for() {
        let second = Duration::from_secs(1);
        let mut watchdog = Watchdog::new();
        let start = Instant::now();
        assert_eq!(watchdog.within(10 * second, async { 7 }).await, Some(7));
        // A long deadline: the timer fires early (armed for less), re-arms, and ends
        // at the deadline.
        assert_eq!(watchdog.within(60 * second, std::future::pending::<()>()).await, None);
        assert_eq!(Instant::now(), start + 60 * second);
        // A deadline shorter than the one it is armed for moves it.
        let now = Instant::now();
        assert_eq!(watchdog.within(120 * second, async {}).await, Some(()));
        assert_eq!(watchdog.within(2 * second, std::future::pending::<()>()).await, None);
        assert_eq!(Instant::now(), now + 2 * second);
        // Work that finishes in time is not cut.
        let now = Instant::now();
        let slow = tokio::time::sleep(5 * second);
        assert_eq!(watchdog.within(6 * second, slow).await, Some(()));
        assert_eq!(Instant::now(), now + 5 * second);
        // Work done at once arms nothing: the timer stays where it was.
        let armed = watchdog.sleep.deadline();
        assert!(armed > Instant::now());
        assert_eq!(watchdog.within(second / 2, async { 1 }).await, Some(1));
        assert_eq!(watchdog.sleep.deadline(), armed);
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
            let headers = Box::leak(Box::new([httparse::EMPTY_HEADER; super::super::HEADERS_COUNT_MAX]));
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
