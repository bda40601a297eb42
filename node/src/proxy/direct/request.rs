//! A request head as the direct path reads it: one pass over the parsed headers
//! decides whether this codec takes the request and what is forwarded.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use super::{DIRECT_BODY_BYTES_MAX, DIRECT_HEADERS_MAX};
use crate::proxy::lifecycle::{self, Forwarded, RequestRule};

/// Visible ASCII and spaces only: what `HeaderValue::to_str` accepts.
pub(super) fn text(value: &[u8]) -> Option<&str> {
    value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)).then(|| std::str::from_utf8(value).ok()).flatten()
}

/// The `http` crate's own bound on a URI's length (`u16::MAX - 1`); a head this codec
/// reads is far shorter.
const HTTP_CRATE_URI_BYTES_MAX: usize = u16::MAX as usize - 1;

/// Whether the `http` crate's URI parser takes `target` (which starts with `/` and
/// holds no `#`) for certain, told without making a `PathAndQuery` (which copies the
/// target onto the heap, about 1.5% of a plain request's instructions): every byte is
/// one it takes anywhere in a path or a query. `false` says nothing; the parser then
/// decides.
pub(super) fn uri_surely_valid(target: &str) -> bool {
    target.len() < HTTP_CRATE_URI_BYTES_MAX
        && target.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-._~%!$&'()*+,;=:@?".contains(&b))
}

/// The comma-separated tokens of a `Connection` value.
pub(super) fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(|token| token.trim_matches([' ', '\t'])).filter(|token| !token.is_empty())
}

/// Request headers this codec does not carry (the hyper adapter does): `Expect`
/// (100-continue), `Upgrade` (a tunnel), `Transfer-Encoding` (a streamed body), `TE`
/// (trailers asked for).
pub(super) fn refused_by_codec(name: &str) -> bool {
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
pub(super) struct Head<'a> {
    /// The lifecycle's rule for each header, by position (`Drop` for those the
    /// client's `Connection` names).
    pub(super) rules: [RequestRule; DIRECT_HEADERS_MAX],
    pub(super) content_length: usize,
    /// The client sent a `Content-Length`.
    pub(super) declared: bool,
    pub(super) host: &'a str,
    /// The client asked to close after this request.
    pub(super) close: bool,
    /// The `X-Forwarded-For` lines left after removing what `Connection` names,
    /// joined (`None` when one is not text).
    pub(super) forwarded_for: Option<Cow<'a, str>>,
    /// Which `X-Forwarded-*` headers are left.
    pub(super) forwarded: [bool; 6],
}

impl<'a> Head<'a> {
    pub(super) fn read(headers: &'a [httparse::Header<'a>]) -> Option<Head<'a>> {
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
    pub(super) fn sent(&self, which: Forwarded) -> bool {
        self.forwarded[which as usize]
    }
}

/// `X-Forwarded-For` lines joined in order, as one list (RFC 9110 §5.3): a second
/// line is not a way to hide hops from `--trusted-ips`.
#[derive(Default)]
pub(super) struct ForwardedFor<'a> {
    pub(super) chain: Option<Cow<'a, str>>,
    /// A line was not text: no chain at all.
    pub(super) broken: bool,
}

impl<'a> ForwardedFor<'a> {
    pub(super) fn add(&mut self, value: &'a [u8]) {
        let Some(line) = text(value) else {
            self.broken = true;
            return;
        };
        self.chain = Some(match self.chain.take() {
            None => Cow::Borrowed(line),
            Some(chain) => Cow::Owned(format!("{chain}, {line}")),
        });
    }

    pub(super) fn chain(self) -> Option<Cow<'a, str>> {
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
pub(super) fn header_map(headers: &[httparse::Header<'_>], head: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len() + crate::proxy::REQUEST_HEADERS_ADDED);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte `uri_surely_valid` takes, the `http` crate's parser takes too, in a
    /// path and in a query.
    #[test]
    fn a_target_surely_valid_is_one_the_uri_parser_takes() {
        let mut taken = 0;
        for byte in 0..=255u8 {
            for target in [format!("/a{}b", byte as char), format!("/a?q={}b", byte as char)] {
                if uri_surely_valid(&target) {
                    taken += 1;
                    assert!(http::uri::PathAndQuery::try_from(target.as_str()).is_ok(), "{target:?}");
                }
            }
        }
        // Letters, digits and the 20 others, in both places.
        assert_eq!(taken, 2 * (62 + 20));
        assert!(!uri_surely_valid("/a b") && !uri_surely_valid("/a<b") && !uri_surely_valid("/a\"b"));
    }

    #[test]
    fn request_heads_the_direct_path_leaves_to_the_general_one() {
        let parse = |raw: &'static [u8]| {
            let headers = Box::leak(Box::new([httparse::EMPTY_HEADER; crate::proxy::HEADERS_COUNT_MAX]));
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
