//! Connections to upstreams: HTTP/1.1 (`http`), h2c (`grpc`), and TLS (`https` over
//! HTTP/1.1, `grpcs` over h2) with Kong's verification options, through keep-alive
//! pools, and host names resolved through a TTL cache.
//!
//! Each proxy worker owns a [`Clients`]: one pool for plain HTTP/1.1, one for h2c, and
//! one per distinct TLS profile (verification, trust anchors, client certificate, SNI
//! name, ALPN). A profile is compiled into the snapshot with its service, so a request
//! never parses a certificate; its key is a hash of what it was built from, so a
//! config change that leaves a service's TLS settings alone keeps its pooled
//! connections.
//!
//! Verification follows Kong: `tls_verify` unset means off (nginx's
//! `proxy_ssl_verify off`, Kong's default). When on, the upstream's certificate must
//! chain to one of the service's `ca_certificates`, or when it has none to the system
//! bundle ([`SYSTEM_CA_BUNDLES`]), and name the service's `host`, which is also the
//! SNI name sent. `tls_verify_depth` bounds the certificates above the leaf, as in
//! OpenSSL. `client_certificate` is presented when the upstream asks for one.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde_json::Value;
use tollgate_raft_store::entities;
use tollgate_raft_store::schema::Object;
use tollgate_raft_store::state::ConfigState;
use tollgate_raft_store::EntityKind;

use super::connect::{DnsCache, Timeouts, WriteTimed};
use super::pool::{DirectPool, H1Pool, PoolReturn, SendError, UPSTREAM_IDLE_CONNECTIONS_MAX, UPSTREAM_IDLE_TIMEOUT};
use super::BoxError;
use super::UpstreamBody;

/// Distinct h2c and TLS clients (profile and timeouts) one worker keeps; past this
/// they are dropped and rebuilt as requests need them.
pub const TLS_PROFILES_MAX: usize = 1024;
/// Where the system's trust anchors are looked for (Debian/Ubuntu/Alpine, then
/// Fedora/RHEL), for `tls_verify` without `ca_certificates`.
pub const SYSTEM_CA_BUNDLES: [&str; 2] = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"];
/// How a service's requests reach its upstream.
#[derive(Clone, Debug, Default)]
pub enum Transport {
    /// `http`: HTTP/1.1 in clear text.
    #[default]
    Http1,
    /// `grpc`: HTTP/2 with prior knowledge, in clear text.
    H2c,
    /// `https` and `grpcs`.
    Tls(Arc<TlsProfile>),
    /// The service's TLS settings cannot be used; requests answer 502 with this.
    Unusable(String),
}

impl Transport {
    /// The transport of one service, with its TLS profile compiled from `state`.
    pub fn for_service(service: &entities::Service, state: &ConfigState) -> Transport {
        let protocol = service.protocol.as_str();
        match protocol {
            "grpc" => Transport::H2c,
            "https" | "grpcs" => match TlsProfile::for_service(service, state, protocol == "grpcs") {
                Ok(profile) => Transport::Tls(Arc::new(profile)),
                Err(error) => {
                    tracing::warn!(service = %service.id, %error, "service TLS settings not usable");
                    Transport::Unusable(error)
                }
            },
            _ => Transport::Http1,
        }
    }

    /// Whether requests go over HTTP/2 (gRPC needs it for trailers).
    pub fn is_h2(&self) -> bool {
        match self {
            Transport::H2c => true,
            Transport::Tls(profile) => profile.h2,
            _ => false,
        }
    }
}

/// A compiled rustls client configuration with the SNI name it connects with.
pub struct TlsProfile {
    key: u64,
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    h2: bool,
}

impl std::fmt::Debug for TlsProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsProfile").field("server_name", &self.server_name).field("h2", &self.h2).finish()
    }
}

impl TlsProfile {
    fn for_service(service: &entities::Service, state: &ConfigState, h2: bool) -> Result<TlsProfile, String> {
        let text =
            |entity: &Object, field: &str| entity.get(field).and_then(Value::as_str).unwrap_or_default().to_string();
        let mut anchors = Vec::new();
        for id in service.ca_certificates.iter().flatten() {
            let ca = state
                .table(EntityKind::CaCertificate)
                .get(id)
                .ok_or_else(|| format!("ca_certificates: unknown id {id}"))?;
            anchors.push(text(ca, "cert"));
        }
        let client = match service.client_certificate {
            Some(key) => {
                let certificate = state
                    .table(EntityKind::Certificate)
                    .get(&key.id)
                    .ok_or_else(|| format!("client_certificate: unknown id {}", key.id))?;
                Some((text(certificate, "cert"), text(certificate, "key")))
            }
            None => None,
        };
        TlsProfile::build(TlsSettings {
            host: &service.host,
            verify: service.tls_verify.unwrap_or(false),
            depth: service.tls_verify_depth.map(|depth| depth as usize),
            anchors: &anchors,
            client: client.as_ref(),
            h2,
        })
    }

    fn build(settings: TlsSettings<'_>) -> Result<TlsProfile, String> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        settings.hash(&mut hasher);
        let key = hasher.finish();
        let server_name = ServerName::try_from(settings.host.to_string())
            .map_err(|error| format!("host: not usable as a TLS server name: {error}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = if settings.verify {
            let roots = if settings.anchors.is_empty() {
                system_roots()?
            } else {
                let mut roots = RootCertStore::empty();
                for pem in settings.anchors {
                    for anchor in trust_anchors(pem)? {
                        roots.add(anchor).map_err(|error| format!("ca_certificates: {error}"))?;
                    }
                }
                Arc::new(roots)
            };
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|error| format!("ca_certificates: {error}"))?;
            Some(webpki)
        } else {
            None
        };
        let verifier = Arc::new(UpstreamVerifier { provider: provider.clone(), webpki, depth: settings.depth });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|error| error.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match settings.client {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|error| format!("client_certificate: {error}"))?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                    .map_err(|error| format!("client_certificate: {error}"))?;
                builder.with_client_auth_cert(chain, key).map_err(|error| format!("client_certificate: {error}"))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = if settings.h2 { vec![b"h2".to_vec()] } else { vec![b"http/1.1".to_vec()] };
        Ok(TlsProfile { key, config: Arc::new(config), server_name, h2: settings.h2 })
    }
}

/// A TLS client config for health probes of `host` (its SNI), verifying the target's
/// certificate against the system's roots when `verify` (Kong's
/// `https_verify_certificate`).
pub fn probe_tls(host: &str, verify: bool) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), String> {
    let profile = TlsProfile::build(TlsSettings { host, verify, depth: None, anchors: &[], client: None, h2: false })?;
    Ok((profile.config, profile.server_name))
}

/// What a TLS profile is built from; its hash keys the profile's pool.
#[derive(Hash)]
struct TlsSettings<'a> {
    host: &'a str,
    verify: bool,
    depth: Option<usize>,
    anchors: &'a [String],
    client: Option<&'a (String, String)>,
    h2: bool,
}

/// The certificates of a PEM bundle, for a trust store.
pub fn trust_anchors(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("not a PEM certificate: {error}"))?;
    if certificates.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    let mut store = RootCertStore::empty();
    for certificate in &certificates {
        store.add(certificate.clone()).map_err(|error| format!("not a usable certificate: {error}"))?;
    }
    Ok(certificates)
}

/// The system bundle, read once per process.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let path = SYSTEM_CA_BUNDLES.iter().find(|path| std::path::Path::new(path).exists()).ok_or_else(|| {
                format!("tls_verify: no ca_certificates and no system bundle at {SYSTEM_CA_BUNDLES:?}")
            })?;
            let pem = std::fs::read_to_string(path).map_err(|error| format!("tls_verify: reading {path}: {error}"))?;
            let mut roots = RootCertStore::empty();
            let certificates = CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok);
            let (added, _ignored) = roots.add_parsable_certificates(certificates);
            if added == 0 {
                return Err(format!("tls_verify: no usable certificate in {path}"));
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

/// Checks an upstream's certificate: with `webpki`, that it chains to the trust
/// anchors and names the server, and that at most `depth` certificates sit above the
/// leaf (OpenSSL's meaning: depth 1 is a leaf issued by a trusted CA directly); without
/// (Kong's default), not at all. The handshake's signatures are always checked.
#[derive(Debug)]
struct UpstreamVerifier {
    provider: Arc<CryptoProvider>,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    depth: Option<usize>,
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        if let Some(depth) = self.depth {
            // The issuing CA counts as one level; every intermediate sent counts too.
            if intermediates.len() + 1 > depth.max(1) {
                return Err(rustls::Error::General(format!("certificate chain longer than tls_verify_depth {depth}")));
            }
        }
        webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A TCP connection with its writes timed.
pub type TimedTcp = WriteTimed<crate::env::Stream>;

/// A connection to an upstream, in clear text or TLS.
pub enum UpstreamStream {
    Plain(TokioIo<TimedTcp>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TimedTcp>>>),
}

impl hyper::rt::Read for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            UpstreamStream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            UpstreamStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            UpstreamStream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            UpstreamStream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(stream) => stream.is_write_vectored(),
            UpstreamStream::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Plain(_) => Connected::new(),
            UpstreamStream::Tls(stream) => {
                if stream.inner().get_ref().1.alpn_protocol() == Some(b"h2") {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}

/// Opens TCP connections (names through the DNS cache) and, with a profile, runs the
/// TLS handshake on them, both within the connect timeout. A failed handshake is a
/// connect failure: nothing of the request was sent, so it may be retried on another
/// target.
#[derive(Clone)]
pub struct Connector {
    tcp: HttpConnector<DnsCache>,
    tls: Option<Arc<TlsProfile>>,
    connect_timeout: Duration,
    write_timeout_ms: Arc<AtomicU64>,
}

/// A connect attempt that took longer than the connect timeout.
#[derive(Debug)]
pub struct ConnectTimedOut;

impl std::fmt::Display for ConnectTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream connect timed out")
    }
}

impl std::error::Error for ConnectTimedOut {}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tcp = self.tcp.clone();
        let tls = self.tls.clone();
        let write_timeout = self.write_timeout_ms.clone();
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let connect = async move {
                let tcp = WriteTimed::new(super::connect::dial(&tcp, uri).await?, write_timeout);
                let Some(profile) = tls else {
                    return Ok(UpstreamStream::Plain(TokioIo::new(tcp)));
                };
                let connector = tokio_rustls::TlsConnector::from(profile.config.clone());
                let stream = connector.connect(profile.server_name.clone(), tcp).await?;
                Ok(UpstreamStream::Tls(Box::new(TokioIo::new(stream))))
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(connected) => connected,
                Err(_) => Err(ConnectTimedOut.into()),
            }
        })
    }
}

pub type UpstreamClient = Client<Connector, UpstreamBody>;

/// What one pooled hyper-util client is for: its TLS profile (or h2c), and the
/// timeouts its connections are opened and written with.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ClientKey {
    tls: Option<u64>,
    connect_ms: u128,
    write_ms: u128,
}

/// One worker's upstream pools.
pub struct Clients {
    dns: DnsCache,
    http1: Arc<H1Pool>,
    /// The direct path's own connections (plain HTTP/1.1 only).
    pub direct: Arc<DirectPool>,
    /// h2c and TLS clients, by profile and timeouts.
    pooled: ArcSwap<HashMap<ClientKey, UpstreamClient>>,
}

impl Default for Clients {
    fn default() -> Self {
        Clients::new(DnsCache::system())
    }
}

/// Where one service's requests go: the worker's own HTTP/1.1 pool, or a pooled
/// hyper-util client (h2c, TLS).
// Lives on the stack for one request; boxing the client would cost an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Sender<'a> {
    Pool(&'a Arc<H1Pool>, Timeouts),
    Client(UpstreamClient),
}

impl Sender<'_> {
    /// Sends a request with an absolute URI (`fresh`: not on an idle connection of the
    /// worker's pool); with the pool, also what gives the connection back once the
    /// response body is done.
    pub async fn send(
        &self,
        request: http::Request<UpstreamBody>,
        fresh: bool,
    ) -> Result<(http::Response<hyper::body::Incoming>, Option<PoolReturn>), SendError> {
        match self {
            Sender::Pool(pool, timeouts) => {
                let Some(authority) = request.uri().authority().cloned() else {
                    return Err(SendError::Connect("no upstream address".into()));
                };
                let (response, back) = pool.send(&authority, request, *timeouts, fresh).await?;
                Ok((response, Some(back)))
            }
            Sender::Client(client) => match client.request(request).await {
                Ok(response) => Ok((response, None)),
                Err(failure) if failure.is_connect() => {
                    if is_connect_timeout(&failure) {
                        Err(SendError::ConnectTimeout)
                    } else {
                        Err(SendError::Connect(failure.into()))
                    }
                }
                Err(failure) => Err(SendError::Request(failure.into())),
            },
        }
    }
}

fn is_connect_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if current.is::<ConnectTimedOut>() {
            return true;
        }
        cause = current.source();
    }
    false
}

impl Clients {
    pub fn new(dns: DnsCache) -> Clients {
        Clients {
            http1: H1Pool::new(dns.clone()),
            direct: DirectPool::new(dns.clone()),
            dns,
            pooled: ArcSwap::default(),
        }
    }

    /// Where a service's requests go, with its timeouts; `None` when its TLS settings
    /// cannot be used.
    pub fn get(&self, transport: &Transport, timeouts: Timeouts) -> Option<Sender<'_>> {
        let (tls, h2) = match transport {
            Transport::Http1 => return Some(Sender::Pool(&self.http1, timeouts)),
            Transport::H2c => (None, true),
            Transport::Tls(profile) => (Some(profile.clone()), profile.h2),
            Transport::Unusable(_) => return None,
        };
        let key = ClientKey {
            tls: tls.as_ref().map(|profile| profile.key),
            connect_ms: timeouts.connect.as_millis(),
            write_ms: timeouts.write.as_millis(),
        };
        if let Some(client) = self.pooled.load().get(&key) {
            return Some(Sender::Client(client.clone()));
        }
        let client = build_client(&self.dns, tls, h2, timeouts);
        self.pooled.rcu(|pools| {
            let mut pools = if pools.len() >= TLS_PROFILES_MAX { HashMap::new() } else { (**pools).clone() };
            pools.insert(key, client.clone());
            pools
        });
        Some(Sender::Client(client))
    }
}

fn build_client(dns: &DnsCache, tls: Option<Arc<TlsProfile>>, h2: bool, timeouts: Timeouts) -> UpstreamClient {
    let mut tcp = HttpConnector::new_with_resolver(dns.clone());
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    let mut builder = Client::builder(TokioExecutor::new());
    builder.pool_max_idle_per_host(UPSTREAM_IDLE_CONNECTIONS_MAX).pool_idle_timeout(UPSTREAM_IDLE_TIMEOUT);
    builder.http2_only(h2);
    let write_timeout_ms = Arc::new(AtomicU64::new(timeouts.write.as_millis() as u64));
    builder.build(Connector { tcp, tls, connect_timeout: timeouts.connect, write_timeout_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_profiles_are_keyed_by_their_settings() {
        let anchors = Vec::new();
        let settings =
            |host, verify| TlsSettings { host, verify, depth: None, anchors: &anchors, client: None, h2: false };
        let a = TlsProfile::build(settings("a.internal", false)).unwrap();
        let same = TlsProfile::build(settings("a.internal", false)).unwrap();
        let other = TlsProfile::build(settings("b.internal", false)).unwrap();
        assert_eq!(a.key, same.key);
        assert_ne!(a.key, other.key);
        let error = TlsProfile::build(TlsSettings {
            host: "a.internal",
            verify: true,
            depth: None,
            anchors: &["not a pem".to_string()],
            client: None,
            h2: false,
        })
        .err()
        .unwrap();
        assert!(error.contains("certificate"), "{error}");
    }
}
