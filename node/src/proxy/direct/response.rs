//! Response heads as the direct path writes them: the upstream's, copied and
//! rewritten in one pass, and the ones the proxy or a plugin makes.

use std::mem::MaybeUninit;

use http::{HeaderMap, HeaderValue, StatusCode};

use super::request::{text, tokens};
use crate::proxy::lifecycle::{self, Answer, PluginRun, ResponseRule, Stamp, Stamped};

/// Parses a response head into `response`, with uninitialised room for its headers.
pub(in crate::proxy) fn parse_response<'h, 'b>(
    response: &mut httparse::Response<'h, 'b>,
    buf: &'b [u8],
    headers: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> httparse::Result<usize> {
    httparse::ParserConfig::default().parse_response_with_uninit_headers(response, buf, headers)
}

/// The length and status of a final response head whole at the start of `buf`, found
/// without parsing its fields: a status line `HTTP/1.x DDD` with a status of 200 or
/// more, to the end of the first empty line after it (CRLF or a bare LF, as httparse
/// takes both). `None` leaves the head (partial, interim, or unusual) to the full
/// parse. The head is parsed once, when it is written: parsing it when it arrived as
/// well was a twentieth of a plain request's instructions (callgrind).
pub(in crate::proxy) fn final_head(buf: &[u8]) -> Option<(usize, u16)> {
    let [b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'0' | b'1', b' ', hundreds, tens, units, after, ..] = *buf else {
        return None;
    };
    if ![hundreds, tens, units].iter().all(u8::is_ascii_digit) || !matches!(after, b' ' | b'\r' | b'\n') {
        return None;
    }
    let code = u16::from(hundreds - b'0') * 100 + u16::from(tens - b'0') * 10 + u16::from(units - b'0');
    if code < 200 {
        return None;
    }
    let mut from = 12;
    while let Some(at) = memchr::memchr(b'\n', &buf[from..]) {
        let line_end = from + at + 1;
        match &buf[line_end..] {
            [b'\n', ..] => return Some((line_end + 1, code)),
            [b'\r', b'\n', ..] => return Some((line_end + 2, code)),
            [] | [b'\r'] => return None,
            _ => from = line_end,
        }
    }
    None
}

pub(in crate::proxy) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A field whose value comes in pieces, joined. Inlined: called through a closure for
/// each forwarded field, out of line it cost about 2% of a plain request's
/// instructions (callgrind).
#[inline]
pub(in crate::proxy) fn put_pieces(out: &mut Vec<u8>, name: &[u8], pieces: &[&[u8]]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    for piece in pieces {
        out.extend_from_slice(piece);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes `value` in decimal (`write!` goes through the formatting machinery).
pub(in crate::proxy) fn put_number(out: &mut Vec<u8>, mut value: u64) {
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

/// How the response body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::proxy) enum Body {
    /// None (`HEAD`, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes.
    UntilClose,
}

pub(in crate::proxy) struct Framing {
    pub(in crate::proxy) body: Body,
    /// The upstream keeps the connection open after this response.
    pub(in crate::proxy) upstream_keepalive: bool,
    /// The client connection closes after this response.
    pub(in crate::proxy) close_client: bool,
    pub(in crate::proxy) dated: bool,
    /// The `Content-Length` the client gets (the upstream's is never copied: a
    /// `Connection` naming it would leave the body unframed).
    pub(in crate::proxy) content_length: Option<u64>,
}

/// How an upstream's response is framed (RFC 9112 §6.3); `None` when it is not one
/// to pass on (502): unparseable lengths, or lengths that disagree
/// ([`lifecycle::check_response_lengths`], as the hyper adapter checks them).
pub(in crate::proxy) fn framing(
    response: &httparse::Response<'_, '_>,
    method: &str,
    client_close: bool,
) -> Option<Framing> {
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
pub(super) fn status_line(out: &mut Vec<u8>, code: u16, reason: &str) {
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
pub(super) fn raw_response_head(
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
    stamp.each(|field, value| {
        if replaced_by_plugin(field.name()) {
            return;
        }
        out.extend_from_slice(field.name().as_bytes());
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
pub(super) fn mapped_response_head(
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
pub(super) fn write_answer(out: &mut Vec<u8>, answer: &Answer, close: bool, head: bool) -> u64 {
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
pub(in crate::proxy) fn framing_headers(out: &mut Vec<u8>, body: Body, length: Option<u64>, close: bool, dated: bool) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Whenever `final_head` finds a head, httparse parses the same bytes to a whole
    /// head of that length and status; where it finds none, the head is partial,
    /// interim, or one only the full parse takes.
    #[test]
    fn a_final_head_found_unparsed_is_the_head_httparse_parses() {
        type Found = Option<(usize, u16)>;
        let heads: &[(&[u8], Found)] = &[
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", Some((38, 200))),
            (b"HTTP/1.1 204 No Content\r\n\r\n", Some((27, 204))),
            (b"HTTP/1.0 404\r\n\r\n", Some((16, 404))),
            // Bare LF line ends, and a body holding what a CRLF head ends with.
            (b"HTTP/1.1 200 OK\na: b\n\nbody\r\n\r\n", Some((22, 200))),
            (b"HTTP/1.1 200 OK\r\na: b\n\r\n", Some((24, 200))),
            // Partial: more to read.
            (b"HTTP/1.1 200 OK\r\na: b\r\n", None),
            (b"HTTP/1.1 200 OK\r\na: b\r\n\r", None),
            (b"HTTP/1.1 20", None),
            // Interim, switching, or not a plain status line: the full parse decides.
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", None),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", None),
            (b"\r\nHTTP/1.1 200 OK\r\n\r\n", None),
            (b"HTTP/2.0 200 OK\r\n\r\n", None),
            (b"HTTP/1.1 2x0 OK\r\n\r\n", None),
        ];
        for (bytes, expected) in heads {
            let found = final_head(bytes);
            assert_eq!(found, *expected, "{}", String::from_utf8_lossy(bytes));
            if let Some((len, code)) = found {
                let mut headers = [const { MaybeUninit::uninit() }; 8];
                let mut response = httparse::Response::new(&mut []);
                let parsed = parse_response(&mut response, bytes, &mut headers);
                assert_eq!(parsed, Ok(httparse::Status::Complete(len)), "{}", String::from_utf8_lossy(bytes));
                assert_eq!(response.code, Some(code));
            }
        }
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for value in [0, 7, 10, 12345, u64::MAX] {
            let mut out = Vec::new();
            put_number(&mut out, value);
            assert_eq!(out, value.to_string().into_bytes());
        }
    }
}
