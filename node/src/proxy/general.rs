//! The hyper adapter (the "general path"): the codec for what the direct HTTP/1.1
//! codec leaves, hyper's server on the client's side. HTTP/2 and h2c clients, TLS and
//! gRPC upstreams, `Upgrade` (WebSocket and others), streamed and chunked bodies,
//! plugins that read the response body (response-transformer's JSON edits,
//! proxy-cache), and every request with `--proxy-direct off`.
//!
//! Upstream, a request whose body is at hand (none, or one read whole) to a plain
//! `http` service takes the direct codec's exchange (`general/plain.rs`); hyper's
//! client carries the rest (streamed bodies, `Upgrade`, TLS, h2c and gRPC upstreams)
//! and everything with `--proxy-direct off`.
//!
//! Policy is the lifecycle's (`lifecycle.rs`); this file turns hyper's request into
//! the lifecycle's request head, runs the phases in order, and carries bodies: the
//! client's, bounded and replayable when retries need it; the upstream's, timed
//! between frames by the service's `read_timeout` like the direct codec's reads.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::error::{ErrorKind, ProxyError};
use super::lifecycle::{self, Access, Answer, AttemptPlan, Attempted, PluginRun, RequestHead, Stamp};
use super::pool::{PoolReturn, SendError};
use super::router::{strip_port, RequestView};
use super::telemetry::{self, RouteMetrics};
use super::upstream::{self, Sender};
use super::{direct, BoxError, ClientConn, InFlight, ProxyBody, ProxySnapshot, RequestId, UpstreamBody};
use super::{CLIENT_BODY_TIMEOUT, REQUEST_HEADERS_ADDED, RESPONSE_HEADERS_ADDED, RETRY_BODY_BYTES_MAX};
use crate::conn;

mod plain;

/// What the log phase learns of a request on its way.
#[derive(Default)]
struct Learnt<'s> {
    metrics: Option<&'s Arc<RouteMetrics>>,
    run: Option<PluginRun>,
    from_upstream: bool,
    upstream: Option<String>,
    upstream_ms: Option<f64>,
    /// Gives the upstream connection back when the response body is done.
    pool_return: Option<PoolReturn>,
}

/// Answers one request of `connection`, which is told when the request started and
/// when its response has been sent, for the connection's timers.
pub async fn handle(connection: &ClientConn, request: Request<Incoming>) -> Response<ProxyBody> {
    if let Some(state) = &connection.state {
        state.request_started(request.version() == http::Version::HTTP_2);
    }
    let guard = conn::RequestGuard::new(connection.state.clone());
    let proxy = &*connection.proxy;
    let _in_flight = InFlight::new(&proxy.load);
    let started = Instant::now();
    // RFC 9112 §6.3: after a request framed by Transfer-Encoding (which may also have
    // carried a Content-Length hyper discarded), close the connection, so bytes a
    // Content-Length-framing hop sent as body are never read as a next request.
    let close_after = request.headers().contains_key(http::header::TRANSFER_ENCODING);
    let logged = proxy.access_log.as_ref().map(|_| (request.method().clone(), request.uri().path().to_string()));
    let compiled = proxy.published.load();
    let snapshot = &compiled.proxy;
    let request_id = proxy.next_request_id();
    let mut learnt = Learnt { metrics: snapshot.unmatched_metrics.as_ref(), ..Learnt::default() };
    let mut response = match forward(connection, snapshot, &request_id, request, started, &mut learnt).await {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(%error, request_id = request_id.as_str(), "request failed");
            answer_response(lifecycle::error_answer(&error, learnt.run.as_mut(), request_id.as_str()))
        }
    };
    if close_after {
        response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    let metrics = learnt.metrics.map(|metrics| &**metrics);
    let trace = lifecycle::Trace {
        started,
        request_id: request_id.as_str(),
        method: logged.as_ref().map_or("", |(method, _)| method.as_str()),
        path: logged.as_ref().map_or("", |(_, path)| path.as_str()),
        peer: connection.peer.ip(),
        tls: connection.tls,
        metrics,
        upstream: learnt.upstream.as_deref(),
        upstream_ms: learnt.upstream_ms,
    };
    let ending = lifecycle::Ending {
        status: response.status().as_u16(),
        from_upstream: learnt.from_upstream,
        response_bytes: response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
    };
    let access_log = proxy.access_log.as_ref();
    lifecycle::finish(&trace, &ending, learnt.run.as_ref(), access_log, &proxy.plugin_state, Instant::now());
    // The body counts what it sends and, when it is done, tells the connection.
    let egress = metrics.map_or_else(metrics::Counter::noop, |metrics| metrics.egress_bytes.clone());
    let (parts, body) = response.into_parts();
    let counted = telemetry::CountingBody::new(body, egress).with_guard((guard, learnt.pool_return.take()));
    Response::from_parts(parts, BodyExt::boxed(counted))
}

/// The phases, from admit to the response head.
async fn forward<'s>(
    connection: &ClientConn,
    snapshot: &'s ProxySnapshot,
    request_id: &RequestId,
    request: Request<Incoming>,
    started: Instant,
    learnt: &mut Learnt<'s>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let proxy = &*connection.proxy;
    let id = request_id.as_str();
    let (mut parts, body) = request.into_parts();
    // Room for what the proxy and plugins add, so the map grows once.
    parts.headers.reserve(REQUEST_HEADERS_ADDED);
    // What the client's hop-by-hop fields ask for is read now; then they go, with
    // every field its `Connection` names, before any plugin runs: a client must not
    // be able to name a header a plugin sets (`X-Consumer-ID`,
    // `X-Anonymous-Consumer`) and have it removed on the way upstream.
    let upgrade = requested_upgrade(&parts);
    let client_wants_trailers = asks_for_trailers(&parts.headers);
    lifecycle::remove_hop_by_hop(&mut parts.headers);
    // The client's URI is only read from here on; the upstream gets a new one.
    let uri = std::mem::take(&mut parts.uri);
    let grpc =
        parts.headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // `Host` as sent (HTTP/2: the authority), kept apart from the map plugins change.
    let sent_host = parts.headers.get(HOST).cloned();
    if sent_host.is_none() && parts.version == http::Version::HTTP_11 && uri.authority().is_none() {
        return Err(ErrorKind::MissingHost.into());
    }
    let client_host = sent_host.as_ref().and_then(|host| host.to_str().ok());
    let client_host = client_host.or_else(|| uri.authority().map(Authority::as_str)).unwrap_or_default();
    let declared_length =
        parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let head = RequestHead {
        method: parts.method.as_str(),
        path: uri.path(),
        query: uri.query(),
        target_len: uri.path_and_query().map_or(0, |target| target.as_str().len()),
        host: client_host,
        forwarded_for: forwarded_for_chain(&parts.headers).map(|chain| Cow::Owned(chain.into_owned())),
        content_length: declared_length,
        tls: connection.tls,
        grpc,
    };

    // admit → rewrite → route
    let path = lifecycle::admit(&head)?;
    if let Err(exit) = lifecycle::rewrite(snapshot, &head, &parts.method, &path, &mut parts.headers) {
        return Ok(answer_response(lifecycle::plain_exit_answer(exit, id)));
    }
    let routed = {
        let host = request_host(&parts.headers, &uri);
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        let view = RequestView {
            method: parts.method.as_str(),
            host: &host,
            path: &path,
            headers: &parts.headers,
            protocol: head.scheme(),
        };
        lifecycle::route(snapshot, &view)?
    };
    learnt.metrics = routed.metrics;
    let named = |name: &str| parts.headers.get(name).and_then(|value| value.to_str().ok());
    let client_ip =
        lifecycle::client_ip(&proxy.trusted_ips, connection.peer.ip(), head.forwarded_for.as_deref(), named);

    // access (plugins run for routes without a service too: request-termination is
    // often used so)
    let ingress = routed.metrics.map_or_else(metrics::Counter::noop, |metrics| metrics.ingress_bytes.clone());
    let mut body = Some(telemetry::CountingBody::new(body, ingress));
    let state = &proxy.plugin_state;
    match lifecycle::access(
        snapshot,
        &routed,
        &head,
        &path,
        client_ip,
        &parts.method,
        &mut parts.headers,
        &mut body,
        state,
    )
    .await
    {
        Access::Exit(mut run, exit) => {
            let answer = lifecycle::exit_answer(exit, &mut run, id);
            learnt.run = Some(run);
            return Ok(answer_response(answer));
        }
        Access::Continue(run) => learnt.run = run,
    }

    // upstream head
    let service = routed.service()?;
    let sender = proxy.clients.get(&service.transport, service.timeouts).ok_or(ErrorKind::UpstreamUnusable)?;
    let target = lifecycle::upstream_target(service, &routed, &path, uri.query(), learnt.run.as_ref())?;
    let method = lifecycle::upstream_method(parts.method.as_str(), learnt.run.as_ref());
    let method = http::Method::from_bytes(method.as_bytes()).unwrap_or_else(|_| parts.method.clone());
    // `Upgrade` (WebSocket and others) passes through: the protocol name goes
    // upstream, and after a 101 both connections are spliced together.
    let client_upgrade = upgrade.as_ref().and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    // Hop-by-hop fields a plugin set (the client's went above).
    lifecycle::remove_hop_by_hop(&mut parts.headers);
    // `TE` is hop-by-hop, but a client that takes trailers says so upstream too (gRPC
    // needs it): Kong sends `TE: trailers` alone, whatever the upstream's protocol
    // (spec/02-integration/05-proxy/03-upstream_headers_spec.lua:158).
    if client_wants_trailers {
        parts.headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(protocol) = &upgrade {
        parts.headers.insert(http::header::UPGRADE, protocol.clone());
        parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // `Host` as the plugins left it (HTTP/2: the authority).
    let client_host = match parts.headers.get(HOST) {
        Some(host) => host.to_str().ok().map(str::to_string),
        None => uri.authority().map(|authority| authority.as_str().to_string()),
    };
    let real_ip = if client_ip == connection.peer.ip() {
        Cow::Borrowed(connection.peer_ip.as_bytes())
    } else {
        Cow::Owned(client_ip.to_string().into_bytes())
    };
    let upstream_host = match (routed.route.preserve_host, &client_host) {
        (true, Some(host)) => Some(host.as_bytes()),
        _ => service.host_header.as_ref().map(HeaderValue::as_bytes),
    };
    let forwarding = lifecycle::Forwarding {
        peer_trusted: proxy.trusted_ips.contains(connection.peer.ip()),
        forwarded_for: head.forwarded_for.as_deref(),
        peer_ip: connection.peer_ip.as_bytes(),
        real_ip,
        tls: connection.tls,
        host: client_host.as_deref().map(strip_port),
        port: connection.local_port.as_bytes(),
        path: head.path,
        prefix: routed.stripped_prefix(&path),
        request_id: id,
        upstream_host,
    };

    // The body: one a plugin read (and maybe edited) goes as it is now, with its
    // length. Otherwise a request can be sent again when all its bytes are at hand: no
    // body, or a small one read whole first.
    let client_body_failed = Arc::new(AtomicBool::new(false));
    let body_limit = lifecycle::body_limit(learnt.run.as_ref());
    let balancer = service.balancer.as_deref();
    let may_retry = service.retries > 0 && balancer.is_some_and(|balancer| balancer.len() > 1);
    // A plain `http` upstream is reached by the direct codec's exchange, not hyper's
    // client, when the body is at hand (`plain.rs`); a small body is read whole for it.
    let plain = proxy.direct && matches!(service.transport, upstream::Transport::Http1) && upgrade.is_none();
    let read_body = learnt.run.as_mut().and_then(|run| run.ctx.request_body.take());
    let (replay, streamed): (Option<Bytes>, Option<UpstreamBody>) = match (read_body, body) {
        (Some(bytes), _) => {
            if bytes.len() as u64 > body_limit {
                return Err(ErrorKind::BodyLimitExceeded.into());
            }
            if !(bytes.is_empty() && declared_length == Some(0)) {
                parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            }
            (Some(bytes), None)
        }
        // Only a plugin takes the body, and then it left it in `request_body`.
        (None, None) => (Some(Bytes::new()), None),
        (None, Some(body)) => {
            let flag = flag_failure(client_body_failed.clone());
            let body = http_body_util::Limited::new(body, body_limit as usize).map_err(flag);
            match Body::size_hint(&body).exact().or(declared_length) {
                Some(0) => (Some(Bytes::new()), None),
                Some(length) if length <= RETRY_BODY_BYTES_MAX && (may_retry || plain) => {
                    match tokio::time::timeout(CLIENT_BODY_TIMEOUT, body.collect()).await {
                        Ok(Ok(collected)) => (Some(collected.to_bytes()), None),
                        Ok(Err(failure)) => return Err(client_body_error(failure)),
                        Err(_) => return Err(ErrorKind::BodyTimeout.into()),
                    }
                }
                known => {
                    // A body of unknown length goes chunked to an HTTP/1.1 upstream. Said
                    // so explicitly: hyper's client would otherwise send a GET, HEAD or
                    // CONNECT without it (nginx, and so Kong, sends every body).
                    if known.is_none() && !service.transport.is_h2() {
                        parts.headers.insert(http::header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
                    }
                    (None, Some(body.boxed()))
                }
            }
        }
    };

    // attempts. The balancer hashes the request as the client sent it and the
    // plugins left it (the direct codec's map is the same); the proxy's own fields
    // are set only on what goes upstream.
    let key = super::balancer::BalanceKey { client_ip, headers: &parts.headers, path: &path, query: uri.query() };
    let plan = AttemptPlan {
        service,
        key,
        health: &proxy.health,
        replayable: replay.is_some(),
        idempotent: lifecycle::idempotent(method.as_str()),
        label: proxy.access_log.is_some(),
    };
    let mut attempted = Attempted { upstream_started: Instant::now(), label: None };
    let read_timeout = service.timeouts.read;
    let sent = match replay {
        // `Host` is always there (the service's, or the client's kept); hyper's client
        // would otherwise name the attempt's address.
        Some(body) if plain && (forwarding.upstream_host.is_some() || parts.headers.contains_key(HOST)) => {
            let mut request = Vec::with_capacity(direct::OUT_BUFFER_BYTES + body.len());
            plain::write_request(&mut request, &method, &target, &parts.headers, &forwarding, &body);
            let pool = &proxy.clients.direct;
            let mut watchdog = direct::watchdog::Watchdog::new();
            let mut upstream =
                direct::DirectUpstream { pool, request: &request, watchdog: &mut watchdog, timeouts: service.timeouts };
            let exchange = lifecycle::attempts(&plan, &mut upstream, &mut attempted).await;
            exchange
                .and_then(|exchange| plain::response(exchange, method.as_str(), pool, Instant::now()))
                .map(|response| (response.map(|body| ReadTimed::new(body, read_timeout).boxed()), None))
        }
        replay => {
            let scheme =
                if matches!(service.transport, upstream::Transport::Tls(_)) { Scheme::HTTPS } else { Scheme::HTTP };
            let mut upstream = HyperUpstream {
                sender,
                method: method.clone(),
                scheme,
                target,
                headers: &parts.headers,
                forwarding: &forwarding,
                replay,
                streamed,
                read_timeout,
                client_body_failed,
            };
            let sent = lifecycle::attempts(&plan, &mut upstream, &mut attempted).await;
            sent.map(|(response, back)| (response.map(|body| ReadTimed::new(body, read_timeout).boxed()), back))
        }
    };
    learnt.upstream = attempted.label.take();
    let (response, back) = sent?;
    let upstream_elapsed = attempted.upstream_started.elapsed();
    let upstream_ms = upstream_elapsed.as_millis() as u64;
    learnt.upstream_ms = Some(upstream_elapsed.as_secs_f64() * 1e3);
    learnt.pool_return = back;

    // response head
    let mut response = response;
    lifecycle::check_response_lengths(response.headers().get_all(CONTENT_LENGTH).iter().map(HeaderValue::as_bytes))?;
    // A HEAD answer that announces a body: a broken upstream may still send it, or
    // answer again, on this connection; reused, it would hand that to another
    // client. The connection is not reused (the direct codec does the same).
    if method == http::Method::HEAD && announces_body(response.headers()) {
        if let Some(back) = &mut learnt.pool_return {
            back.discard();
        }
    }
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(client_upgrade), Some(protocol)) = (client_upgrade, upgrade) else {
            return Err(ErrorKind::UpstreamSwitchedUnasked.into());
        };
        // The upstream connection becomes the tunnel: it never goes back to a pool.
        if let Some(back) = &mut learnt.pool_return {
            back.discard();
        }
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(splice(client_upgrade, upstream_upgrade, id.to_string()));
        let (mut parts, _) = response.into_parts();
        lifecycle::remove_hop_by_hop(&mut parts.headers);
        parts.headers.insert(http::header::UPGRADE, protocol);
        parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(lifecycle::REQUEST_ID_NAME, request_id.header_value());
        return Ok(Response::from_parts(parts, empty_body()));
    }
    let (mut parts, body) = response.into_parts();
    let from_plugins = learnt.run.as_ref().map_or(0, |run| run.ctx.response_headers.len());
    parts.headers.reserve(RESPONSE_HEADERS_ADDED + from_plugins);
    let proxy_ms = (started.elapsed().as_millis() as u64).saturating_sub(upstream_ms);
    // `Trailer` announces trailers: it stays for a client that takes them (Kong:
    // 03-upstream_headers_spec.lua:186 and :206), with the other hop-by-hop fields
    // gone.
    let announced: Vec<HeaderValue> = match client_wants_trailers {
        true => parts.headers.get_all(http::header::TRAILER).iter().cloned().collect(),
        false => Vec::new(),
    };
    Stamp { request_id: id, upstream_ms, proxy_ms }.apply(&mut parts.headers);
    for value in announced {
        parts.headers.append(http::header::TRAILER, value);
    }
    lifecycle::header_filter(learnt.run.as_mut(), parts.status, &mut parts.headers);
    learnt.from_upstream = true;

    // body filters
    let mut body = body;
    let mut cache_store = None;
    if let Some(run) = &mut learnt.run {
        cache_store = run.ctx.cache_store.take();
        // body_filter: the body read whole, filtered, and sent with its new length.
        if crate::plugins::wants_body(&run.ran, &run.ctx, parts.status, &parts.headers) {
            let mut whole = read_whole(&mut body, crate::plugins::BODY_FILTER_BYTES_MAX).await?;
            crate::plugins::body_filter(&run.ran, &mut run.ctx, parts.status, &parts.headers, &mut whole);
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(whole.len()));
            body = full_body(whole);
        }
    }
    Ok(match cache_store {
        Some(store) => {
            let state = proxy.plugin_state.clone();
            let tee = crate::plugins::cache::CacheTee::new(body, parts.status, &parts.headers, store, state);
            Response::from_parts(parts, tee.boxed())
        }
        None => Response::from_parts(parts, body),
    })
}

/// An upstream body read whole for `body_filter`: 502 past `max` bytes or when it
/// breaks, 504 when a read times out.
async fn read_whole(body: &mut ProxyBody, max: usize) -> Result<Bytes, ProxyError> {
    let mut whole = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    if whole.len() + data.len() > max {
                        return Err(ErrorKind::UpstreamBodyUnreadable.into());
                    }
                    whole.extend_from_slice(data);
                }
            }
            Err(failure) if super::connect::is_timeout(&*failure) => {
                return Err(ProxyError::caused_by(ErrorKind::UpstreamTimeout, failure))
            }
            Err(failure) => return Err(ProxyError::caused_by(ErrorKind::UpstreamBodyUnreadable, failure)),
        }
    }
    Ok(whole.freeze())
}

/// The hyper side of [`lifecycle::Upstream`]: one request, built again per attempt.
struct HyperUpstream<'a> {
    sender: Sender<'a>,
    method: http::Method,
    scheme: Scheme,
    target: PathAndQuery,
    /// The client's fields as the plugins left them, and what the proxy sets on them.
    headers: &'a HeaderMap,
    forwarding: &'a lifecycle::Forwarding<'a>,
    /// The body, when it can be sent again.
    replay: Option<Bytes>,
    /// Or the client's body, streamed once.
    streamed: Option<UpstreamBody>,
    read_timeout: Duration,
    /// The client's body failed (it is not the upstream's fault).
    client_body_failed: Arc<AtomicBool>,
}

impl lifecycle::Upstream for HyperUpstream<'_> {
    type Answer = (Response<Incoming>, Option<PoolReturn>);

    fn status(answer: &Self::Answer) -> u16 {
        answer.0.status().as_u16()
    }

    async fn send(&mut self, authority: &Authority, fresh: bool) -> Result<Self::Answer, ProxyError> {
        let mut target = http::uri::Parts::default();
        target.scheme = Some(self.scheme.clone());
        target.authority = Some(authority.clone());
        target.path_and_query = Some(self.target.clone());
        let uri = Uri::from_parts(target)
            .map_err(|error| ProxyError::caused_by(ErrorKind::UpstreamUnusable, error.into()))?;
        // The read timeout starts once the whole request went out.
        let (sent, body_sent) = tokio::sync::oneshot::channel::<()>();
        let body = match &self.replay {
            Some(bytes) => {
                let _ = sent.send(());
                if bytes.is_empty() {
                    empty_upstream_body()
                } else {
                    Full::new(bytes.clone()).map_err(|never| match never {}).boxed()
                }
            }
            None => match self.streamed.take() {
                Some(body) => SentSignal { inner: body, sent: Some(sent) }.boxed(),
                None => {
                    let _ = sent.send(());
                    empty_upstream_body()
                }
            },
        };
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = self.headers.clone();
        self.forwarding.apply(request.headers_mut());
        let read_timeout = self.read_timeout;
        let head_timer = async move {
            // A dropped sender (the body failed) starts the timer too.
            let _ = body_sent.await;
            tokio::time::sleep(read_timeout).await;
        };
        let sent = tokio::select! {
            biased;
            sent = self.sender.send(request, fresh) => sent,
            () = head_timer => return Err(ErrorKind::UpstreamTimeout.into()),
        };
        sent.map_err(|failure| match failure {
            _ if self.client_body_failed.load(Ordering::Relaxed) => match failure {
                SendError::Connect(cause) | SendError::Closed(cause) | SendError::Request(cause) => {
                    client_body_error(cause)
                }
                SendError::ConnectTimeout => ErrorKind::BodyInvalid.into(),
            },
            SendError::Connect(cause) => ProxyError::caused_by(ErrorKind::UpstreamUnreachable, cause).retryable(true),
            SendError::ConnectTimeout => ErrorKind::UpstreamTimeout.into(),
            SendError::Closed(cause) => ProxyError::caused_by(ErrorKind::UpstreamClosed, cause).retryable(true),
            SendError::Request(cause) if super::connect::is_timeout(&*cause) => {
                ProxyError::caused_by(ErrorKind::UpstreamTimeout, cause)
            }
            SendError::Request(cause) => ProxyError::caused_by(ErrorKind::UpstreamInvalid, cause),
        })
    }
}

/// Marks `flag` when the client's body fails, passing the error on. (A named function:
/// a closure here makes the request future's `Send` check fail on `dyn Error`'s
/// lifetime, rust-lang/rust#64552.)
fn flag_failure(flag: Arc<AtomicBool>) -> impl Fn(BoxError) -> BoxError {
    move |error| {
        flag.store(true, Ordering::Relaxed);
        error
    }
}

/// A client body that failed: 413 when it passed a size limit (the node's, or
/// request-size-limiting's), 400 when it was malformed.
fn client_body_error(failure: BoxError) -> ProxyError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*failure);
    while let Some(current) = cause {
        if current.is::<http_body_util::LengthLimitError>() {
            return ProxyError::caused_by(ErrorKind::BodyLimitExceeded, failure);
        }
        cause = current.source();
    }
    ProxyError::caused_by(ErrorKind::BodyInvalid, failure)
}

/// A streamed request body that says when it has been sent whole.
struct SentSignal {
    inner: UpstreamBody,
    sent: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Body for SentSignal {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = &polled {
            if let Some(sent) = self.sent.take() {
                let _ = sent.send(());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream response body cut off when no frame arrives for the read timeout
/// (Kong's `read_timeout` between two reads); the client's connection then closes
/// without the rest, as on the direct codec.
pub struct ReadTimed<B> {
    inner: B,
    timeout: Duration,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> ReadTimed<B> {
    pub fn new(inner: B, timeout: Duration) -> ReadTimed<B> {
        ReadTimed { inner, timeout, waiting: None }
    }
}

impl<B> Body for ReadTimed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = None;
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let waiting = this.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match waiting.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        metrics::counter!("tollgate_proxy_timeouts_total", "kind" => "upstream_read").increment(1);
                        let timed_out =
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream body read timed out");
                        Poll::Ready(Some(Err(timed_out.into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An answer the proxy or a plugin made, as a hyper response.
fn answer_response(answer: Answer) -> Response<ProxyBody> {
    let Answer { status, mut headers, body } = answer;
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn full_body(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty_body() -> ProxyBody {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed()
}

fn empty_upstream_body() -> UpstreamBody {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed()
}

/// The protocol a client asks to switch to: `Connection: upgrade` with `Upgrade: X`,
/// on HTTP/1.1.
fn requested_upgrade(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != http::Version::HTTP_11 {
        return None;
    }
    let asks = parts
        .headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    parts.headers.get(http::header::UPGRADE).cloned()
}

/// Copies bytes both ways between an upgraded client connection and an upgraded
/// upstream connection until either side closes.
async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, request_id: String) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(failure) => {
            tracing::debug!(%failure, request_id, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(failure) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%failure, request_id, "upgraded connection ended");
    }
}

/// The host a request names, as sent: `Host`, or the URI's authority (HTTP/2).
fn request_host<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> &'a str {
    headers.get(HOST).and_then(|h| h.to_str().ok()).or_else(|| uri.authority().map(|a| a.as_str())).unwrap_or_default()
}

/// Whether the client's `TE` lists `trailers`.
fn asks_for_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("trailers"))
}

/// Whether a response's head announces a body: a non-zero `Content-Length`, or a
/// `Transfer-Encoding`.
fn announces_body(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|length| length.trim() != "0")
}

/// Every `X-Forwarded-For` line, joined in order as one list (RFC 9110 §5.3), so a
/// second line cannot hide hops from `--trusted-ips`; `None` without one, or when one
/// is not text.
fn forwarded_for_chain(headers: &HeaderMap) -> Option<Cow<'_, str>> {
    let mut lines = headers.get_all(lifecycle::Forwarded::For.name()).iter();
    let first = lines.next()?.to_str().ok()?;
    let mut chain = Cow::Borrowed(first);
    for line in lines {
        let line = line.to_str().ok()?;
        chain = Cow::Owned(format!("{chain}, {line}"));
    }
    Some(chain)
}
