//! The data path's one error type, and the one place an error becomes the client's
//! answer (Pingora's `Error { etype, esource, retry }` and `fail_to_proxy`).
//!
//! Every failure of a request, whichever codec carries it, is a [`ProxyError`]: what
//! went wrong ([`ErrorKind`], which fixes the status and Kong's message), where it
//! came from (the client, the upstream, or the proxy itself), the cause when there is
//! one, and whether the request may be sent again. Retry decisions read `retryable`,
//! never a message. [`ProxyError::body`] is the JSON both codecs send.

use std::fmt;

use http::StatusCode;

use super::BoxError;

/// What went wrong, with the answer it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request path is not `/`-rooted, or has a malformed escape.
    InvalidPath,
    /// An HTTP/1.1 request without `Host` (nor an absolute target): RFC 9112 §3.2, and
    /// nginx's 400 that Kong answers (spec/02-integration/05-proxy/02-router_spec.lua:378).
    MissingHost,
    /// The request target is longer than [`super::URI_BYTES_MAX`].
    UriTooLong,
    /// A declared body longer than [`super::BODY_BYTES_MAX`].
    BodyTooLarge,
    /// A body past the limit a plugin set (request-size-limiting) or
    /// [`super::BODY_BYTES_MAX`] while it streamed.
    BodyLimitExceeded,
    /// The client's body did not arrive in time.
    BodyTimeout,
    /// The client's body broke (a bad chunk).
    BodyInvalid,
    NoRoute,
    /// The route has no service, or its service is disabled.
    NoService,
    /// The service's upstream has no target in rotation.
    NoPeer,
    /// Every target of the service's upstream is down.
    NoHealthyPeer,
    /// The service's address or TLS settings cannot be used.
    UpstreamUnusable,
    /// No connection to the upstream could be made: nothing reached it.
    UpstreamUnreachable,
    /// A reused upstream connection closed before a byte of the answer: the request
    /// may have been read by the upstream, or not.
    UpstreamClosed,
    UpstreamTimeout,
    /// The upstream's answer is not valid HTTP, or the exchange broke after it began.
    UpstreamInvalid,
    /// The upstream answered 101 to a request that asked for no upgrade.
    UpstreamSwitchedUnasked,
    /// A plugin needed the upstream's whole body and could not read it.
    UpstreamBodyUnreadable,
}

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Client,
    Upstream,
    Proxy,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidPath | ErrorKind::BodyInvalid | ErrorKind::MissingHost => StatusCode::BAD_REQUEST,
            ErrorKind::UriTooLong => StatusCode::URI_TOO_LONG,
            ErrorKind::BodyTooLarge | ErrorKind::BodyLimitExceeded => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::NoService | ErrorKind::NoPeer | ErrorKind::NoHealthyPeer => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::UpstreamUnusable
            | ErrorKind::UpstreamUnreachable
            | ErrorKind::UpstreamClosed
            | ErrorKind::UpstreamInvalid
            | ErrorKind::UpstreamSwitchedUnasked
            | ErrorKind::UpstreamBodyUnreadable => StatusCode::BAD_GATEWAY,
        }
    }

    /// Kong's message for it, where Kong has one.
    pub fn message(self) -> &'static str {
        match self {
            ErrorKind::InvalidPath => "invalid request path",
            ErrorKind::MissingHost => "Bad request",
            ErrorKind::UriTooLong => "request URI too long",
            ErrorKind::BodyTooLarge => "request body too large",
            ErrorKind::BodyLimitExceeded => "Request size limit exceeded",
            ErrorKind::BodyTimeout => "request body timed out",
            ErrorKind::BodyInvalid => "invalid request body",
            ErrorKind::NoRoute => "no Route matched with those values",
            ErrorKind::NoService => "no Service found with those values",
            ErrorKind::NoPeer => "failure to get a peer from the ring-balancer",
            ErrorKind::NoHealthyPeer => "failure to get a peer from the ring-balancer: every target is unhealthy",
            ErrorKind::UpstreamUnusable => "the service's upstream address or TLS settings are not usable",
            ErrorKind::UpstreamUnreachable | ErrorKind::UpstreamClosed | ErrorKind::UpstreamInvalid => {
                "An invalid response was received from the upstream server"
            }
            ErrorKind::UpstreamTimeout => "The upstream server is timing out",
            ErrorKind::UpstreamSwitchedUnasked => "the upstream switched protocols unasked",
            ErrorKind::UpstreamBodyUnreadable => "the upstream body could not be read whole",
        }
    }

    pub fn source(self) -> Source {
        match self {
            ErrorKind::InvalidPath
            | ErrorKind::MissingHost
            | ErrorKind::UriTooLong
            | ErrorKind::BodyTooLarge
            | ErrorKind::BodyLimitExceeded
            | ErrorKind::BodyTimeout
            | ErrorKind::BodyInvalid => Source::Client,
            ErrorKind::NoRoute
            | ErrorKind::NoService
            | ErrorKind::NoPeer
            | ErrorKind::NoHealthyPeer
            | ErrorKind::UpstreamUnusable => Source::Proxy,
            ErrorKind::UpstreamUnreachable
            | ErrorKind::UpstreamClosed
            | ErrorKind::UpstreamTimeout
            | ErrorKind::UpstreamInvalid
            | ErrorKind::UpstreamSwitchedUnasked
            | ErrorKind::UpstreamBodyUnreadable => Source::Upstream,
        }
    }
}

/// A request's failure.
pub struct ProxyError {
    pub kind: ErrorKind,
    /// The cause, for the log.
    pub cause: Option<BoxError>,
    /// Whether the request may be sent again (on another target, or on a fresh
    /// connection): nothing of it reached an upstream, or it is idempotent and the
    /// upstream closed a reused connection before answering (RFC 9110 §9.2.2).
    pub retryable: bool,
}

impl ProxyError {
    pub fn new(kind: ErrorKind) -> ProxyError {
        ProxyError { kind, cause: None, retryable: false }
    }

    /// With its cause (boxed by the caller: a generic `Into` here trips the request
    /// future's `Send` check on `dyn Error`'s lifetime, rust-lang/rust#64552).
    pub fn caused_by(kind: ErrorKind, cause: BoxError) -> ProxyError {
        ProxyError { kind, cause: Some(cause), retryable: false }
    }

    pub fn retryable(mut self, retryable: bool) -> ProxyError {
        self.retryable = retryable;
        self
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// The JSON body of the answer: Kong's `message`, and the request id.
    pub fn body(&self, request_id: &str) -> String {
        error_body(self.kind.message(), request_id)
    }
}

impl From<ErrorKind> for ProxyError {
    fn from(kind: ErrorKind) -> ProxyError {
        ProxyError::new(kind)
    }
}

impl fmt::Debug for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({:?})", self.kind, self.kind.source())?;
        if let Some(cause) = &self.cause {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

/// Kong's JSON error body, with the request id.
pub fn error_body(message: &str, request_id: &str) -> String {
    serde_json::json!({ "message": message, "request_id": request_id }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_answer_kongs_statuses_and_messages() {
        let error = ProxyError::from(ErrorKind::NoRoute);
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        assert_eq!(error.body("1-1"), r#"{"message":"no Route matched with those values","request_id":"1-1"}"#);
        assert_eq!(ErrorKind::UpstreamTimeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(ErrorKind::UpstreamClosed.source(), Source::Upstream);
        assert!(ProxyError::new(ErrorKind::UpstreamUnreachable).retryable(true).retryable);
    }
}
