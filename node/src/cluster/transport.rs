//! The cluster port's TCP side: Raft RPC and requests forwarded to the leader, as
//! HTTP/1.1 POSTs whose bodies are [`codec`] frames (a version byte, then postcard),
//! over mutual TLS when the node has cluster certificates ([`super::tls`]).
//!
//! Without TLS (loopback only) a request is authenticated by an HMAC tag in the
//! `x-tollgate-auth` header when the cluster has a secret (`--cluster-secret`): the
//! tag covers the time, the path and the frame, and is refused past
//! [`AUTH_SKEW`] either way, so a captured request cannot be replayed later. With
//! neither, every local process can speak for any node (`tollgate run` says so at
//! start).
//!
//! This module is the network seam: [`PeerClient`] is the only thing that dials peers
//! and [`serve`] the only thing that answers them, so the simulation can swap both.
//!
//! Bounds on the answering side: [`CLUSTER_CONNECTIONS_MAX`] connections,
//! [`CLUSTER_PENDING_MAX`] of them not yet authenticated (the oldest is closed to make
//! room), header, idle and send timeouts, [`CLUSTER_FRAME_BYTES_MAX`] per frame and
//! [`CLUSTER_INFLIGHT_BYTES_MAX`] of frames being read at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::time::Instant;
use tollgate_raft_store::codec;

use super::tls::{server_name_of, ClusterTls, PeerIdentity};
use crate::conn::Timeouts;
use crate::serve::{Caller, Http1Server, Limits};
use crate::NodeId;

/// Largest frame accepted on the cluster port (an append batch or a snapshot chunk).
pub const CLUSTER_FRAME_BYTES_MAX: usize = 128 * 1024 * 1024;
/// Bytes of frames being read at once on the cluster port, over all connections.
pub const CLUSTER_INFLIGHT_BYTES_MAX: usize = 512 * 1024 * 1024;
/// Idle keep-alive connections kept per peer.
const PEER_IDLE_CONNECTIONS_MAX: usize = 8;
/// An idle pooled connection older than this is not used again (the peer's idle
/// timeout is [`CLUSTER_KEEPALIVE_TIMEOUT`]).
const PEER_IDLE_MAX: Duration = Duration::from_secs(30);
/// Longest a connection to a peer may take to open (TCP and TLS).
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Most cluster-port connections open at once (peers pool theirs, so a few per peer).
pub const CLUSTER_CONNECTIONS_MAX: usize = 256;
/// Cluster-port connections not yet authenticated (no TLS handshake or first
/// request yet); the oldest is closed to make room for a new one.
pub const CLUSTER_PENDING_MAX: usize = 32;
/// The cluster port's timeouts: a request head, an idle pooled connection (peers
/// heartbeat every few ms, so only dead ones idle this long), a write.
pub const CLUSTER_TIMEOUTS: Timeouts =
    Timeouts { header: Duration::from_secs(10), keepalive: CLUSTER_KEEPALIVE_TIMEOUT, send: Duration::from_secs(30) };
pub const CLUSTER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// How far apart the sender's and the receiver's clocks may be for an HMAC-tagged
/// request (and how long a captured one could be replayed).
pub const AUTH_SKEW: Duration = Duration::from_secs(30);
/// The header carrying the HMAC tag without TLS.
const AUTH_HEADER: &str = "x-tollgate-auth";

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

/// A peer to send to: its address and, when known, its node id (its certificate must
/// name it).
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    pub address: &'a str,
    pub id: Option<NodeId>,
}

/// How requests to peers are authenticated.
#[derive(Clone)]
pub enum ClusterAuth {
    /// Mutual TLS.
    Tls(Arc<ClusterTls>),
    /// An HMAC tag keyed by the cluster secret (loopback only).
    Secret(Arc<ring::hmac::Key>),
    /// Nothing (loopback only, no secret).
    None,
}

impl ClusterAuth {
    /// The HMAC key of a cluster secret, bound to its use here.
    pub fn secret(secret: &str, cluster_id: &str) -> ClusterAuth {
        let material = format!("tollgate-cluster-port\0{cluster_id}\0{secret}");
        ClusterAuth::Secret(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, material.as_bytes())))
    }
}

/// The tag of a request sent at `unix_ms` to `path` with `frame`.
fn auth_tag(key: &ring::hmac::Key, unix_ms: u64, path: &str, frame: &[u8]) -> ring::hmac::Tag {
    let mut context = ring::hmac::Context::with_key(key);
    context.update(&unix_ms.to_be_bytes());
    context.update(path.as_bytes());
    context.update(&[0]);
    context.update(frame);
    context.sign()
}

/// Whether `header` is a valid tag of `path` and `frame`, made within [`AUTH_SKEW`].
fn auth_valid(key: &ring::hmac::Key, header: Option<&HeaderValue>, path: &str, frame: &[u8]) -> bool {
    let Some((sent_ms, tag)) = header.and_then(|v| v.to_str().ok()).and_then(|v| v.split_once('.')) else {
        return false;
    };
    let (Ok(sent_ms), Some(tag)) = (sent_ms.parse::<u64>(), crate::text::unhex(tag)) else { return false };
    if crate::clock::wall_ms().abs_diff(sent_ms) > AUTH_SKEW.as_millis() as u64 {
        return false;
    }
    let expected = auth_tag(key, sent_ms, path, frame);
    subtle::ConstantTimeEq::ct_eq(expected.as_ref(), tag.as_slice()).into()
}

/// Idle connections by (address, node id).
type Idle = HashMap<(String, Option<NodeId>), Vec<(SendRequest<Full<Bytes>>, Instant)>>;

/// Pooled HTTP/1.1 client for peers' cluster ports.
#[derive(Clone)]
pub struct PeerClient {
    auth: ClusterAuth,
    idle: Arc<Mutex<Idle>>,
}

impl PeerClient {
    pub fn new(auth: ClusterAuth) -> PeerClient {
        PeerClient { auth, idle: Arc::default() }
    }

    /// Whether peers are authenticated (TLS or the cluster secret).
    pub fn authenticates(&self) -> bool {
        !matches!(self.auth, ClusterAuth::None)
    }

    /// POSTs an encoded request to `peer` at `path` and decodes the answer.
    pub async fn call<Req, Resp>(
        &self,
        peer: Peer<'_>,
        path: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
    {
        let address = peer.address;
        let failed = |reason: String| PeerError::Failed { address: address.to_string(), reason };
        let lost = |reason: String| PeerError::Lost { address: address.to_string(), reason };
        let frame = Bytes::from(codec::encode(request).map_err(|e| failed(e.to_string()))?);
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(http::header::HOST, address)
            .header(http::header::CONTENT_TYPE, "application/x-tollgate-frame");
        if let ClusterAuth::Secret(key) = &self.auth {
            let now = crate::clock::wall_ms();
            let tag = auth_tag(key, now, path, &frame);
            builder = builder.header(AUTH_HEADER, format!("{now}.{}", crate::text::hex(tag.as_ref())));
        }
        let http_request = builder.body(Full::new(frame)).map_err(|e| failed(e.to_string()))?;
        let key = (address.to_string(), peer.id);
        let exchange = async {
            let mut sender = match self.checkout(&key).await {
                Some(sender) => sender,
                None => self.connect(peer).await?,
            };
            let response = sender.send_request(http_request).await.map_err(|e| lost(e.to_string()))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), CLUSTER_FRAME_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| lost(e.to_string()))?
                .to_bytes();
            self.put(key, sender).await;
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

    /// An idle connection to the peer that can take a request now.
    async fn checkout(&self, key: &(String, Option<NodeId>)) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().await;
        let connections = idle.get_mut(key)?;
        while let Some((sender, since)) = connections.pop() {
            if sender.is_ready() && since.elapsed() < PEER_IDLE_MAX {
                return Some(sender);
            }
        }
        None
    }

    async fn put(&self, key: (String, Option<NodeId>), sender: SendRequest<Full<Bytes>>) {
        if !sender.is_ready() {
            return;
        }
        let mut idle = self.idle.lock().await;
        if idle.len() >= CLUSTER_CONNECTIONS_MAX && !idle.contains_key(&key) {
            idle.clear();
        }
        let connections = idle.entry(key).or_default();
        if connections.len() < PEER_IDLE_CONNECTIONS_MAX {
            connections.push((sender, Instant::now()));
        }
    }

    /// A new connection (TCP, then TLS when configured): any failure here means
    /// nothing was sent.
    async fn connect(&self, peer: Peer<'_>) -> Result<SendRequest<Full<Bytes>>, PeerError> {
        let address = peer.address;
        let refused = |reason: String| PeerError::Connect { address: address.to_string(), reason };
        let opened = async {
            let stream = crate::env::connect(address).await.map_err(|e| refused(e.to_string()))?;
            let io: Box<dyn crate::env::Io> = match &self.auth {
                ClusterAuth::Tls(tls) => {
                    let connector = tokio_rustls::TlsConnector::from(tls.client_config());
                    let stream = connector
                        .connect(server_name_of(peer.id), stream)
                        .await
                        .map_err(|e| refused(format!("tls: {e}")))?;
                    Box::new(stream)
                }
                _ => Box::new(stream),
            };
            Ok::<_, PeerError>(io)
        };
        let io = tokio::time::timeout(PEER_CONNECT_TIMEOUT, opened)
            .await
            .map_err(|_| refused(format!("not connected within {} ms", PEER_CONNECT_TIMEOUT.as_millis())))??;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| refused(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "peer connection ended");
            }
        });
        Ok(sender)
    }
}

/// Why a frame was refused: the HTTP answer it gets.
#[derive(Debug)]
pub enum Refusal {
    /// Malformed, or not for this path (400).
    Bad(String),
    /// The sender may not send it (403): not a member, or not who it claims to be.
    Forbidden(String),
}

/// What answers the cluster port: a path, a frame and who sent it in, a frame out.
pub trait FrameHandler: Send + Sync + 'static {
    fn handle(
        &self,
        path: String,
        frame: Bytes,
        from: PeerIdentity,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, Refusal>> + Send;
}

/// Serves the cluster port until `shutdown` turns true.
pub async fn serve<H: FrameHandler>(
    listener: crate::env::Listener,
    auth: ClusterAuth,
    handler: Arc<H>,
    shutdown: watch::Receiver<bool>,
) {
    let tls = match &auth {
        ClusterAuth::Tls(tls) => {
            let tls = tls.clone();
            let source: crate::serve::TlsSource = Arc::new(move || tls.server_config());
            Some(source)
        }
        _ => None,
    };
    let server = Http1Server {
        name: "cluster",
        limits: Limits {
            connections_max: CLUSTER_CONNECTIONS_MAX,
            per_peer_max: CLUSTER_CONNECTIONS_MAX,
            pending_max: CLUSTER_PENDING_MAX,
        },
        timeouts: CLUSTER_TIMEOUTS,
        tls,
    };
    let inflight = Arc::new(Semaphore::new(CLUSTER_INFLIGHT_BYTES_MAX));
    let answer_with = move |caller, request| answer(handler.clone(), auth.clone(), inflight.clone(), caller, request);
    crate::serve::serve_http1(listener, server, answer_with, shutdown).await;
}

async fn answer<H: FrameHandler>(
    handler: Arc<H>,
    auth: ClusterAuth,
    inflight: Arc<Semaphore>,
    caller: Caller,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_string();
    if request.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "POST only");
    }
    // Memory: a frame's bytes are reserved before they are read, within the port's
    // budget (a frame without a length reserves the largest).
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > CLUSTER_FRAME_BYTES_MAX) {
        return plain(StatusCode::PAYLOAD_TOO_LARGE, "frame too large");
    }
    let reserve = declared.unwrap_or(CLUSTER_FRAME_BYTES_MAX).max(1) as u32;
    let Ok(_reserved) = inflight.acquire_many(reserve).await else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let tag = request.headers().get(AUTH_HEADER).cloned();
    let body = match Limited::new(request.into_body(), CLUSTER_FRAME_BYTES_MAX).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => return plain(StatusCode::PAYLOAD_TOO_LARGE, &error.to_string()),
    };
    let from = match &auth {
        ClusterAuth::Tls(_) => match caller.certificate {
            Some(certificate) => PeerIdentity::Certificate(certificate),
            // The handshake requires one; this is not reached.
            None => return plain(StatusCode::UNAUTHORIZED, "no client certificate"),
        },
        ClusterAuth::Secret(key) => {
            if !auth_valid(key, tag.as_ref(), &path, &body) {
                tracing::debug!(peer = %caller.address, %path, "cluster request without a valid tag");
                metrics::counter!("tollgate_cluster_requests_refused_total", "reason" => "unauthenticated")
                    .increment(1);
                return plain(StatusCode::UNAUTHORIZED, "missing or invalid cluster authentication");
            }
            PeerIdentity::Unauthenticated
        }
        ClusterAuth::None => PeerIdentity::Unauthenticated,
    };
    match handler.handle(path, body, from).await {
        Ok(frame) => Response::new(Full::new(Bytes::from(frame))),
        Err(Refusal::Bad(reason)) => {
            tracing::debug!(peer = %caller.address, %reason, "cluster request refused");
            plain(StatusCode::BAD_REQUEST, &reason)
        }
        Err(Refusal::Forbidden(reason)) => {
            tracing::warn!(peer = %caller.address, %reason, "cluster request refused");
            metrics::counter!("tollgate_cluster_requests_refused_total", "reason" => "forbidden").increment(1);
            plain(StatusCode::FORBIDDEN, &reason)
        }
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_string())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_covers_time_path_and_frame() {
        let ClusterAuth::Secret(key) = ClusterAuth::secret("s3cret", "tollgate") else { unreachable!() };
        let now = crate::clock::wall_ms();
        let tag = |ms: u64, path: &str, frame: &[u8]| {
            let tag = auth_tag(&key, ms, path, frame);
            HeaderValue::from_str(&format!("{ms}.{}", crate::text::hex(tag.as_ref()))).ok()
        };
        assert!(auth_valid(&key, tag(now, "/raft/vote", b"x").as_ref(), "/raft/vote", b"x"));
        assert!(!auth_valid(&key, tag(now, "/raft/vote", b"x").as_ref(), "/raft/append", b"x"));
        assert!(!auth_valid(&key, tag(now, "/raft/vote", b"x").as_ref(), "/raft/vote", b"y"));
        let old = now - AUTH_SKEW.as_millis() as u64 - 1000;
        assert!(!auth_valid(&key, tag(old, "/raft/vote", b"x").as_ref(), "/raft/vote", b"x"), "replayed late");
        let ClusterAuth::Secret(other) = ClusterAuth::secret("other", "tollgate") else { unreachable!() };
        let forged = auth_tag(&other, now, "/raft/vote", b"x");
        let forged = HeaderValue::from_str(&format!("{now}.{}", crate::text::hex(forged.as_ref()))).ok();
        assert!(!auth_valid(&key, forged.as_ref(), "/raft/vote", b"x"));
        assert!(!auth_valid(&key, None, "/raft/vote", b"x"));
    }
}
