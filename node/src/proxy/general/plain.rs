//! The general path's exchange with a plain `http` upstream, on the direct codec's
//! parts instead of hyper's client.
//!
//! A request the hyper adapter serves (HTTP/2 above all) whose body is whole, that
//! asks for no upgrade, to a plain `http` service, goes upstream as the direct codec
//! sends its own: the head written straight from the header map into one buffer,
//! sent on a connection of the worker's direct pool that the request owns
//! ([`DirectUpstream`]), the response head read with `httparse` into the header map
//! the client's side needs. No hyper client connection, no channel to its task, no
//! request or response re-encoded by a second HTTP library. The response body is then
//! read from the connection as the client's side pulls frames ([`PlainBody`]), and
//! the connection goes back to the pool when the body ended where its framing said,
//! with nothing after it.
//!
//! What hyper's client did, this does the same way: `Content-Length` written from the
//! body (kept at 0 when one was sent with an empty body), interim 1xx answers skipped,
//! a 101 to a request that asked for no upgrade refused, the framing checks of the
//! direct codec (RFC 9112 §6.3; lengths that disagree are a 502), trailers of a
//! chunked body passed on as trailers. With `--proxy-direct off` hyper's client
//! carries these requests too, as before (to compare the two, or to step around a
//! fault of the direct codec's parts).

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::header::CONTENT_LENGTH;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncReadExt;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::proxy::direct::chunked::{Chunked, Decoded};
use crate::proxy::direct::response::{self, framing, parse_response, put_number, put_pieces};
use crate::proxy::direct::{Exchange, TRAILER_BYTES_MAX, UPSTREAM_HEADERS_MAX, UPSTREAM_READ_BYTES};
use crate::proxy::error::{ErrorKind, ProxyError};
use crate::proxy::lifecycle::Forwarding;
use crate::proxy::pool::{DirectConn, DirectPool};
use crate::proxy::{BoxError, RESPONSE_HEADERS_ADDED};

#[cfg(doc)]
use crate::proxy::direct::DirectUpstream;

/// Trailer fields of one chunked response, in number (their bytes are bounded by
/// [`TRAILER_BYTES_MAX`]): the body fails above.
pub const TRAILERS_MAX: usize = 32;

/// Writes the upstream request into `out`: the request line, the fields of `headers`
/// with what `forwarding` sets on them (`Host` among them, or kept from the client's),
/// `Content-Length` aside, which is written from `body` (and kept, as 0, when the
/// client sent one with an empty body), then the body.
pub(super) fn write_request(
    out: &mut Vec<u8>,
    method: &Method,
    target: &PathAndQuery,
    headers: &HeaderMap,
    forwarding: &Forwarding<'_>,
    body: &[u8],
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // As `Forwarding::apply` would leave the map, without making a value per field
    // the proxy sets (a tenth of an h2 request's instructions).
    forwarding.write(headers, |name, pieces| put_pieces(out, name.as_bytes(), pieces));
    if !body.is_empty() || headers.contains_key(CONTENT_LENGTH) {
        out.extend_from_slice(b"content-length: ");
        put_number(out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// The response whose head `exchange` read, to a request of `method`; its body is
/// read from the connection as it is pulled, which then goes back to `pool`. A 502
/// when the head is not one to pass on (unparseable, lengths that disagree, a field
/// the header map refuses).
pub(super) fn response(
    exchange: Exchange,
    method: &str,
    pool: &Arc<DirectPool>,
    answered: Instant,
) -> Result<Response<PlainBody>, ProxyError> {
    let Exchange { mut connection, head_len, authority, .. } = exchange;
    let head = connection.buf.split_to(head_len).freeze();
    let mut slots = [const { MaybeUninit::uninit() }; UPSTREAM_HEADERS_MAX];
    let mut parsed = httparse::Response::new(&mut []);
    let invalid = |what: &str| ProxyError::caused_by(ErrorKind::UpstreamInvalid, broken(what));
    if parse_response(&mut parsed, &head, &mut slots) != Ok(httparse::Status::Complete(head_len)) {
        return Err(invalid("upstream response head unparseable"));
    }
    let framing = framing(&parsed, method, false).ok_or_else(|| invalid("upstream response framing refused"))?;
    let status = parsed.code.and_then(|code| StatusCode::from_u16(code).ok());
    let status = status.ok_or_else(|| invalid("upstream response status refused"))?;
    // Room for what the proxy adds, so the map grows no more.
    let mut headers = HeaderMap::with_capacity(parsed.headers.len() + RESPONSE_HEADERS_ADDED);
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes());
        // The value is a slice of the head, shared rather than copied.
        let value = HeaderValue::from_maybe_shared(head.slice_ref(field.value));
        match (name, value) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => return Err(invalid("upstream response header refused")),
        }
    }
    let state = match framing.body {
        response::Body::Empty | response::Body::Length(0) => State::Done,
        response::Body::Length(length) => State::Length(length),
        response::Body::Chunked => State::Chunked(Chunked::default()),
        response::Body::UntilClose => State::UntilClose,
    };
    let reusable = framing.upstream_keepalive && framing.body != response::Body::UntilClose;
    let mut body = PlainBody {
        connection: Some(Mutex::new(connection)),
        state,
        back: Back { pool: pool.clone(), authority, answered, reusable },
    };
    if matches!(body.state, State::Done) {
        body.end();
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Where a connection goes back when its response body ended.
struct Back {
    pool: Arc<DirectPool>,
    authority: Authority,
    /// When the response head arrived (the connection's idle time counts from there).
    answered: Instant,
    /// The upstream keeps the connection open after this response.
    reusable: bool,
}

/// How much of the body is left to read.
enum State {
    Length(u64),
    Chunked(Chunked),
    /// The last chunk came; the trailer section is read next.
    Trailers,
    UntilClose,
    Done,
}

/// An upstream response body, read from the connection that carried its head as the
/// client's side pulls it. Dropped before its end, the connection closes with it.
/// Reads are timed by the general path's [`super::ReadTimed`] around it.
pub struct PlainBody {
    /// In a mutex only to be `Sync`, as boxed bodies must be: it is never locked
    /// (`get_mut` and `into_inner` take it by `&mut` and by value).
    connection: Option<Mutex<DirectConn>>,
    state: State,
    back: Back,
}

impl PlainBody {
    /// The body ended: its connection goes back to the pool when the upstream keeps
    /// it open and sent nothing after the body.
    fn end(&mut self) {
        self.state = State::Done;
        if let Some(connection) = self.connection.take().map(Mutex::into_inner) {
            if self.back.reusable && connection.buf.is_empty() {
                self.back.pool.put(&self.back.authority, connection, self.back.answered);
            }
        }
    }
}

/// What an upstream broke, as an error cause.
fn broken(what: &str) -> BoxError {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()).into()
}

impl Body for PlainBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(connection) = this.connection.as_mut().map(Mutex::get_mut) else { return Poll::Ready(None) };
            let buf = &mut connection.buf;
            // What the bytes at hand give, if anything.
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Length(remaining) if !buf.is_empty() => {
                    let take = (*remaining).min(buf.len() as u64);
                    *remaining -= take;
                    let data = buf.split_to(take as usize).freeze();
                    if *remaining == 0 {
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose if !buf.is_empty() => {
                    let data = buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Chunked(chunks) if !buf.is_empty() => match chunks.decode(buf) {
                    Ok(Decoded::Data { skip, len }) => {
                        buf.advance(skip);
                        return Poll::Ready(Some(Ok(Frame::data(buf.split_to(len).freeze()))));
                    }
                    Ok(Decoded::More) => buf.clear(),
                    Ok(Decoded::Trailers { skip }) => {
                        buf.advance(skip);
                        this.state = State::Trailers;
                        continue;
                    }
                    Err(()) => return Poll::Ready(Some(Err(broken("upstream sent a malformed chunked body")))),
                },
                State::Trailers if !buf.is_empty() => {
                    let mut fields = [httparse::EMPTY_HEADER; TRAILERS_MAX];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((length, fields))) => {
                            let trailers = trailer_map(fields);
                            buf.advance(length);
                            this.end();
                            return match trailers {
                                Some(map) if map.is_empty() => Poll::Ready(None),
                                Some(map) => Poll::Ready(Some(Ok(Frame::trailers(map)))),
                                None => Poll::Ready(Some(Err(broken("upstream sent a trailer field refused")))),
                            };
                        }
                        Ok(httparse::Status::Partial) if buf.len() <= TRAILER_BYTES_MAX => {}
                        _ => return Poll::Ready(Some(Err(broken("upstream sent malformed trailers")))),
                    }
                }
                _ => {}
            }
            // More bytes are needed.
            buf.reserve(UPSTREAM_READ_BYTES);
            let read = std::pin::pin!(connection.stream.read_buf(buf)).poll(cx);
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if matches!(this.state, State::UntilClose) => {
                    this.end();
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    let cut = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    this.connection = None;
                    return Poll::Ready(Some(Err(cut.into())));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(failure)) => {
                    this.connection = None;
                    return Poll::Ready(Some(Err(failure.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(remaining) => SizeHint::with_exact(remaining),
            _ => SizeHint::default(),
        }
    }
}

/// Trailer fields as a header map; `None` when one is not a valid field.
fn trailer_map(fields: &[httparse::Header<'_>]) -> Option<HeaderMap> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        map.append(name, HeaderValue::from_bytes(field.value).ok()?);
    }
    Some(map)
}
