//! A Rust client for Tollgate's Admin API.
//!
//! [`AdminClient`] takes the Admin URLs of several nodes. A request goes to the node that
//! answered last; when that node cannot be reached (the request was never sent), the
//! client moves to the next one. Once a request may have been sent, its answer, or the
//! failure, is returned as it is: retrying a write elsewhere could apply it twice.
#![forbid(unsafe_code)]

#[cfg(feature = "ctl")]
pub mod ctl;
pub mod tls;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
pub use tollgate_raft_store::{ApiError, EntityKind, ErrorCode};

/// Largest answer body the client reads.
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Default time one request may take.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(15);

fn http_connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    // `https://` reaches [`tls::Connector`], which says what it needs.
    connector.enforce_http(false);
    connector
}

fn pool(connector: tls::Connector) -> Client<tls::Connector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector)
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No node could be reached; nothing was sent.
    #[error("no node reachable (tried {tried:?}): {last}")]
    Unreachable { tried: Vec<String>, last: String },
    /// A node answered with an error.
    #[error("{status} from {node}: {error}")]
    Api { node: String, status: u16, error: ApiError },
    /// The request may have been sent but no answer came in time.
    #[error("no answer from {node} within {timeout_ms} ms")]
    Timeout { node: String, timeout_ms: u64 },
    /// The answer could not be read or was not what the API sends.
    #[error("bad answer from {node}: {reason}")]
    Protocol { node: String, reason: String },
}

impl ClientError {
    /// The Admin API error, when a node answered with one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api { error, .. } => Some(error),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub node: String,
    pub status: u16,
    /// `Tollgate-Config-Version`, when the answer carried it.
    pub config_version: Option<u64>,
    /// The JSON body (`Value::Null` for 204).
    pub body: Value,
}

pub struct AdminClient {
    urls: Vec<String>,
    token: Option<String>,
    timeout: Duration,
    current: AtomicUsize,
    http: Client<tls::Connector, Full<Bytes>>,
}

impl AdminClient {
    /// A client over the Admin URLs of some nodes (`http://127.0.0.1:8001`).
    pub fn new<I, S>(urls: I) -> AdminClient
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let urls: Vec<String> = urls.into_iter().map(|u| u.into().trim_end_matches('/').to_string()).collect();
        assert!(!urls.is_empty(), "an AdminClient needs at least one node URL");
        let http = pool(tls::Connector::new(http_connector()));
        AdminClient { urls, token: None, timeout: REQUEST_TIMEOUT_DEFAULT, current: AtomicUsize::new(0), http }
    }

    /// Reaches `https://` Admin URLs (`--admin-tls-cert`), trusting the CA
    /// certificates in the PEM file at `path`.
    pub fn with_ca_file(mut self, path: &std::path::Path) -> Result<AdminClient, String> {
        self.http = pool(tls::Connector::new(http_connector()).with_ca_file(path)?);
        Ok(self)
    }

    pub fn with_token(mut self, token: impl Into<String>) -> AdminClient {
        self.token = Some(token.into());
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> AdminClient {
        self.timeout = timeout;
        self
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Sends a request, moving to the next node while nodes cannot be reached.
    pub async fn request(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Reply, ClientError> {
        let start = self.current.load(Ordering::Relaxed);
        let mut tried = Vec::new();
        let mut last = String::new();
        for step in 0..self.urls.len() {
            let index = (start + step) % self.urls.len();
            match self.send(index, method.clone(), path, Payload::from(body)).await {
                Err(Unsent(reason)) => {
                    tried.push(self.urls[index].clone());
                    last = reason;
                }
                Ok(result) => {
                    self.current.store(index, Ordering::Relaxed);
                    return result;
                }
            }
        }
        Err(ClientError::Unreachable { tried, last })
    }

    /// Sends a request to one node (by its position in the URL list), without failover.
    pub async fn request_node(
        &self,
        index: usize,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, ClientError> {
        match self.send(index, method, path, Payload::from(body)).await {
            Ok(result) => result,
            Err(Unsent(reason)) => {
                Err(ClientError::Unreachable { tried: vec![self.urls[index].clone()], last: reason })
            }
        }
    }

    /// Sends raw bytes with a content type (a YAML config, or a test's malformed body).
    pub async fn request_bytes(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Reply, ClientError> {
        let start = self.current.load(Ordering::Relaxed);
        let payload = Payload::Raw { content_type: content_type.to_string(), body: Bytes::from(body) };
        match self.send(start, method, path, payload).await {
            Ok(result) => result,
            Err(Unsent(reason)) => {
                Err(ClientError::Unreachable { tried: vec![self.urls[start].clone()], last: reason })
            }
        }
    }

    /// GET is idempotent, so a transport failure on a pooled connection that the node
    /// had closed (after refusing an oversized body, say) is retried once.
    pub async fn get(&self, path: &str) -> Result<Reply, ClientError> {
        match self.request(Method::GET, path, None).await {
            Err(ClientError::Protocol { .. }) => self.request(Method::GET, path, None).await,
            other => other,
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Reply, ClientError> {
        self.request(Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<Reply, ClientError> {
        self.request(Method::PUT, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Result<Reply, ClientError> {
        self.request(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Reply, ClientError> {
        self.request(Method::DELETE, path, None).await
    }

    /// Every entity of a collection path, following `next` pages.
    pub async fn list_all(&self, path: &str) -> Result<Vec<Value>, ClientError> {
        let mut entities = Vec::new();
        let separator = if path.contains('?') { '&' } else { '?' };
        let mut next = Some(format!("{path}{separator}size=1000"));
        while let Some(page_path) = next.take() {
            let reply = self.get(&page_path).await?;
            if let Some(data) = reply.body.get("data").and_then(Value::as_array) {
                entities.extend(data.iter().cloned());
            }
            if let Some(offset) = reply.body.get("offset").and_then(Value::as_str) {
                next = Some(format!("{path}{separator}size=1000&offset={offset}"));
            }
        }
        Ok(entities)
    }

    async fn send(
        &self,
        index: usize,
        method: Method,
        path: &str,
        payload: Payload,
    ) -> Result<Result<Reply, ClientError>, Unsent> {
        let node = self.urls[index].clone();
        let mut builder = Request::builder().method(method).uri(format!("{node}{path}"));
        if let Some(token) = &self.token {
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let payload = match payload {
            Payload::Empty => Bytes::new(),
            Payload::Raw { content_type, body } => {
                builder = builder.header(http::header::CONTENT_TYPE, content_type);
                body
            }
        };
        let request = match builder.body(Full::new(payload)) {
            Ok(request) => request,
            Err(error) => return Ok(Err(ClientError::Protocol { node, reason: error.to_string() })),
        };
        let exchange = async {
            let response = self.http.request(request).await.map_err(|error| {
                if error.is_connect() {
                    Err(Unsent(with_causes(&error)))
                } else {
                    Ok(ClientError::Protocol { node: node.clone(), reason: with_causes(&error) })
                }
            })?;
            let status = response.status().as_u16();
            let config_version = response
                .headers()
                .get("tollgate-config-version")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let bytes = Limited::new(response.into_body(), RESPONSE_BYTES_MAX)
                .collect()
                .await
                .map_err(|error| Ok(ClientError::Protocol { node: node.clone(), reason: error.to_string() }))?
                .to_bytes();
            Ok((status, config_version, bytes))
        };
        let (status, config_version, bytes) = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => return Ok(Err(ClientError::Timeout { node, timeout_ms: self.timeout.as_millis() as u64 })),
            Ok(Err(Err(unsent))) => return Err(unsent),
            Ok(Err(Ok(error))) => return Ok(Err(error)),
            Ok(Ok(parts)) => parts,
        };
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(body) => body,
                // /metrics and YAML answers are text.
                Err(_) => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
            }
        };
        if status >= 400 {
            // Kong's answers to a body it cannot read carry the message alone.
            let error = ApiError::from_json(&body).unwrap_or_else(|| match (status, body["message"].as_str()) {
                (415, Some(message)) => ApiError::new(ErrorCode::UnsupportedMediaType, message),
                (405, Some(message)) => ApiError::new(ErrorCode::MethodNotAllowed, message),
                (400, Some(message)) => ApiError::new(ErrorCode::CannotParseBody, message),
                _ => ApiError::new(ErrorCode::Internal, format!("unexpected error body: {body}")),
            });
            return Ok(Err(ClientError::Api { node, status, error }));
        }
        Ok(Ok(Reply { node, status, config_version, body }))
    }
}

enum Payload {
    Empty,
    Raw { content_type: String, body: Bytes },
}

impl From<Option<&Value>> for Payload {
    fn from(body: Option<&Value>) -> Payload {
        match body {
            Some(body) => Payload::Raw { content_type: "application/json".into(), body: Bytes::from(body.to_string()) },
            None => Payload::Empty,
        }
    }
}

/// A request that certainly was not sent (connection refused or failed).
struct Unsent(String);

/// An error with its causes (`client error (Connect): … certificate …`): the pool's
/// own message alone does not say what failed.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}
