//! `tollgate echo`: a demo upstream that answers every request with what it received,
//! as JSON (`method`, `path`, `query`, `headers`, `body`, and the echo's own `listen`).
//! A request asking to `Upgrade` is switched (101) and its bytes are echoed back raw.
//! On a path ending in `/response-headers`, each query argument is also a response
//! header (Kong's mock upstream does so; its specs ask for `Vary` and others that way).

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

/// Largest request body the echo reads back.
pub const ECHO_BODY_BYTES_MAX: usize = 1024 * 1024;

/// Most echo connections open at once.
const ECHO_CONNECTIONS_MAX: usize = 4096;

pub async fn serve(listener: crate::env::Listener, shutdown: watch::Receiver<bool>) {
    let listen = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let server = crate::serve::Http1Server {
        name: "echo",
        limits: crate::serve::Limits {
            connections_max: ECHO_CONNECTIONS_MAX,
            per_peer_max: ECHO_CONNECTIONS_MAX,
            pending_max: ECHO_CONNECTIONS_MAX,
        },
        timeouts: crate::conn::Timeouts {
            header: std::time::Duration::from_secs(30),
            keepalive: std::time::Duration::from_secs(60),
            send: std::time::Duration::from_secs(60),
        },
        tls: None,
    };
    let handler = move |caller: crate::serve::Caller, request| {
        let listen = listen.clone();
        async move { echo(request, caller.address, &listen).await }
    };
    crate::serve::serve_http1(listener, server, handler, shutdown).await;
}

async fn echo(mut request: Request<Incoming>, peer: SocketAddr, listen: &str) -> Response<Full<Bytes>> {
    // `Connection: upgrade` with any `Upgrade` protocol: switch, then echo raw bytes.
    if let Some(protocol) = request.headers().get(http::header::UPGRADE).cloned() {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (mut reader, mut writer) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        response.headers_mut().insert(http::header::UPGRADE, protocol);
        response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("upgrade"));
        return response;
    }
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, ECHO_BODY_BYTES_MAX).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"{\"message\":\"body too large\"}")));
            *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            return response;
        }
    };
    let mut headers = Map::new();
    for (name, value) in &parts.headers {
        let value = Value::from(String::from_utf8_lossy(value.as_bytes()).into_owned());
        match headers.get_mut(name.as_str()) {
            Some(Value::Array(values)) => values.push(value),
            _ => {
                headers.insert(name.as_str().to_string(), Value::Array(vec![value]));
            }
        }
    }
    let answer = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
        "peer": peer.to_string(),
        "listen": listen,
    });
    let mut response = Response::new(Full::new(Bytes::from(answer.to_string())));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    if parts.uri.path().ends_with("/response-headers") {
        add_asked_headers(response.headers_mut(), parts.uri.query().unwrap_or_default());
    }
    response
}

/// Each `name=value` of a query string as a response header (added after any of the
/// same name); a name or value that cannot be one is skipped.
fn add_asked_headers(headers: &mut http::HeaderMap, query: &str) {
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = http::HeaderName::from_bytes(crate::text::percent_decode(name, true).as_bytes());
        let value = http::HeaderValue::from_str(&crate::text::percent_decode(value, true));
        if let (Ok(name), Ok(value)) = (name, value) {
            headers.append(name, value);
        }
    }
}
