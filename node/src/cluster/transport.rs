//! The cluster port's TCP side: Raft RPC and requests forwarded to the leader, as
//! HTTP/1.1 POSTs whose bodies are [`codec`] frames (a version byte, then postcard).
//!
//! This module is the network seam: [`PeerClient`] is the only thing that dials peers
//! and [`serve`] the only thing that answers them, so the simulation can swap both.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tollgate_raft_store::codec;

/// Largest frame accepted on the cluster port (an append batch or a snapshot chunk).
pub const CLUSTER_FRAME_BYTES_MAX: usize = 128 * 1024 * 1024;
/// Idle keep-alive connections kept per peer.
const PEER_IDLE_CONNECTIONS_MAX: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The request never reached the peer: safe to retry anywhere.
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    /// The request may have reached the peer: the outcome is unknown.
    #[error("no answer from {address} within {timeout_ms} ms")]
    Timeout { address: String, timeout_ms: u64 },
    /// The connection broke after the request may have been sent (the peer crashed or
    /// restarted): the outcome is unknown.
    #[error("connection to {address} lost: {reason}")]
    Lost { address: String, reason: String },
    /// The peer refused the frame as larger than it accepts.
    #[error("peer {address} refused a frame as too large")]
    TooLarge { address: String },
    #[error("peer {address} failed: {reason}")]
    Failed { address: String, reason: String },
}

impl PeerError {
    /// Whether the request certainly did not reach the peer.
    pub fn is_not_delivered(&self) -> bool {
        matches!(self, PeerError::Connect { .. })
    }
}

/// Pooled HTTP client for peers' cluster ports.
#[derive(Clone)]
pub struct PeerClient {
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Default for PeerClient {
    fn default() -> Self {
        PeerClient::new()
    }
}

impl PeerClient {
    pub fn new() -> PeerClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(1000)));
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(PEER_IDLE_CONNECTIONS_MAX)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        PeerClient { http }
    }

    /// POSTs an encoded request to `address` (host:port) at `path` and decodes the answer.
    pub async fn call<Req, Resp>(
        &self,
        address: &str,
        path: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
    {
        let failed = |reason: String| PeerError::Failed { address: address.to_string(), reason };
        let frame = codec::encode(request).map_err(|e| failed(e.to_string()))?;
        let uri = format!("http://{address}{path}");
        let http_request = Request::builder()
            .method(Method::POST)
            .uri(&uri)
            .header(http::header::CONTENT_TYPE, "application/x-tollgate-frame")
            .body(Full::new(Bytes::from(frame)))
            .map_err(|e| failed(e.to_string()))?;
        let lost = |reason: String| PeerError::Lost { address: address.to_string(), reason };
        let exchange = async {
            let response = self.http.request(http_request).await.map_err(|e| {
                if e.is_connect() {
                    PeerError::Connect { address: address.to_string(), reason: e.to_string() }
                } else {
                    lost(e.to_string())
                }
            })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), CLUSTER_FRAME_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| lost(e.to_string()))?
                .to_bytes();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                return Err(PeerError::TooLarge { address: address.to_string() });
            }
            if status != StatusCode::OK {
                return Err(failed(format!("status {status}: {}", String::from_utf8_lossy(&body))));
            }
            codec::decode::<Resp>(&body).map_err(|e| failed(e.to_string()))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(PeerError::Timeout { address: address.to_string(), timeout_ms: timeout.as_millis() as u64 }),
        }
    }
}

/// What answers the cluster port: a path and a frame in, a frame out.
pub trait FrameHandler: Send + Sync + 'static {
    fn handle(&self, path: String, frame: Bytes) -> impl std::future::Future<Output = Result<Vec<u8>, String>> + Send;
}

/// Most cluster-port connections open at once (peers pool theirs, so a few per peer).
pub const CLUSTER_CONNECTIONS_MAX: usize = 256;

/// Serves the cluster port until `shutdown` turns true.
pub async fn serve<H: FrameHandler>(listener: TcpListener, handler: Arc<H>, shutdown: watch::Receiver<bool>) {
    let answer_with = move |peer, request| answer(handler.clone(), peer, request);
    crate::serve::serve_http1("cluster", listener, CLUSTER_CONNECTIONS_MAX, answer_with, shutdown).await;
}

async fn answer<H: FrameHandler>(
    handler: Arc<H>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_string();
    if request.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "POST only");
    }
    let body = match Limited::new(request.into_body(), CLUSTER_FRAME_BYTES_MAX).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => return plain(StatusCode::PAYLOAD_TOO_LARGE, &error.to_string()),
    };
    match handler.handle(path, body).await {
        Ok(frame) => Response::new(Full::new(Bytes::from(frame))),
        Err(reason) => {
            tracing::debug!(%peer, %reason, "cluster request refused");
            plain(StatusCode::BAD_REQUEST, &reason)
        }
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_string())));
    *response.status_mut() = status;
    response
}
