//! Mutual TLS on the cluster port: who a peer is.
//!
//! Every node has a certificate from the cluster's CA (`--cluster-ca`) whose subject
//! alternative names include the DNS name `node-<id>.tollgate` ([`node_name`]): the
//! node id is bound to the certificate. Both sides of every connection present one:
//! - A node dialing a peer whose id it knows (Raft RPC, a forward to the leader)
//!   accepts only that node's certificate; a joining node, which knows its seeds only
//!   by address, accepts any certificate of the cluster's CA ([`ANY_MEMBER`]).
//! - A node answering checks the client certificate against the CA during the
//!   handshake, before any byte of a request is parsed, and then each frame's claimed
//!   sender against it ([`PeerIdentity::is`]): an AppendEntries "from node 2" must
//!   come over node 2's certificate.
//!
//! The files are read again when they change ([`ClusterTls::watch`]), so certificates
//! are rotated without a restart: new connections use the new material, open ones
//! keep theirs until they close.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::sync::watch;

use crate::NodeId;

/// The DNS name suffix of node identities.
pub const NODE_NAME_SUFFIX: &str = "tollgate";
/// The server name a joining node dials its seeds with: any certificate of the
/// cluster's CA is accepted for it (the seed's id is not known yet).
pub const ANY_MEMBER: &str = "any-member.tollgate";
/// How often the certificate files are checked for changes.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The name a node's certificate carries: `node-<id>.tollgate`.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.{NODE_NAME_SUFFIX}")
}

/// The cluster TLS files of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One loaded set of files.
struct Material {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// When each file was last modified and its length, to spot changes.
    stamps: Vec<Option<(SystemTime, u64)>>,
}

/// A node's cluster TLS material, reloaded when its files change.
pub struct ClusterTls {
    node_id: NodeId,
    files: TlsFiles,
    current: ArcSwap<Material>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls").field("node_id", &self.node_id).field("files", &self.files).finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [&files.ca, &files.cert, &files.key]
        .into_iter()
        .map(|path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

impl ClusterTls {
    /// Loads the files; fails, naming the file and the flag, when one is missing or
    /// unusable, or when the certificate does not name this node.
    pub fn load(node_id: NodeId, files: TlsFiles) -> anyhow::Result<Arc<ClusterTls>> {
        let material = Material::load(node_id, &files)?;
        Ok(Arc::new(ClusterTls { node_id, files, current: ArcSwap::from_pointee(material) }))
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load().server.clone()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current.load().client.clone()
    }

    /// Reads the files again if any changed; a set that does not load is logged and
    /// the current one kept. Returns whether new material is in use.
    pub fn reload_if_changed(&self) -> bool {
        let current = self.current.load();
        let now = stamps(&self.files);
        if now == current.stamps {
            return false;
        }
        match Material::load(self.node_id, &self.files) {
            Ok(material) => {
                self.current.store(Arc::new(material));
                tracing::info!("cluster TLS material reloaded");
                metrics::counter!("tollgate_cluster_tls_reloads_total").increment(1);
                true
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "cluster TLS files changed but do not load; keeping the current ones");
                false
            }
        }
    }

    /// Reloads changed files every [`TLS_RELOAD_INTERVAL`] until `stop`.
    pub async fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(TLS_RELOAD_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = ticks.tick() => {
                    self.reload_if_changed();
                }
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
        }
    }
}

impl Material {
    fn load(node_id: NodeId, files: &TlsFiles) -> anyhow::Result<Material> {
        let stamps = stamps(files);
        let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.ca)
            .with_context(|| format!("--cluster-ca {}: cannot read", files.ca.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("--cluster-ca {}: not PEM certificates", files.ca.display()))?;
        let mut roots = RootCertStore::empty();
        for certificate in ca {
            roots.add(certificate).with_context(|| format!("--cluster-ca {}: not a usable CA", files.ca.display()))?;
        }
        if roots.is_empty() {
            anyhow::bail!("--cluster-ca {}: no certificate in it", files.ca.display());
        }
        let roots = Arc::new(roots);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
            .with_context(|| format!("--cluster-cert {}: cannot read", files.cert.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("--cluster-cert {}: not PEM certificates", files.cert.display()))?;
        let first =
            chain.first().with_context(|| format!("--cluster-cert {}: no certificate", files.cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .with_context(|| format!("--cluster-key {}: not a PEM private key", files.key.display()))?;
        // The certificate must be this node's and the CA's: a node started with
        // another node's files, or a foreign CA's, says so now.
        let parsed = ParsedCertificate::try_from(first)
            .map_err(|error| anyhow::anyhow!("--cluster-cert {}: {error}", files.cert.display()))?;
        let name = ServerName::try_from(node_name(node_id)).context("node name")?;
        rustls::client::verify_server_name(&parsed, &name).map_err(|_| {
            anyhow::anyhow!(
                "--cluster-cert {}: does not name this node ({}); make node certificates with `tollgate certs init`",
                files.cert.display(),
                node_name(node_id)
            )
        })?;
        let algorithms = provider().signature_verification_algorithms;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            algorithms.all,
        )
        .map_err(|error| {
            anyhow::anyhow!("--cluster-cert {}: not valid under --cluster-ca: {error}", files.cert.display())
        })?;

        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .context("client certificate verifier")?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .with_context(|| format!("--cluster-key {}: does not match the certificate", files.key.display()))?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let verifier = Arc::new(MemberVerifier { roots, algorithms });
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .with_context(|| format!("--cluster-key {}: does not match the certificate", files.key.display()))?;
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Material { server: Arc::new(server), client: Arc::new(client), stamps })
    }
}

/// The server name to dial node `id` with, or any member for `None` (a join's seed).
pub fn server_name_of(id: Option<NodeId>) -> ServerName<'static> {
    let name = id.map_or_else(|| ANY_MEMBER.to_string(), node_name);
    ServerName::try_from(name).unwrap_or_else(|_| ServerName::try_from(ANY_MEMBER).expect("a valid DNS name"))
}

/// Checks a server's certificate: it chains to the cluster's CA and, unless dialed as
/// [`ANY_MEMBER`], names the node that was dialed.
#[derive(Debug)]
struct MemberVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let any_member = matches!(server_name, ServerName::DnsName(name) if name.as_ref() == ANY_MEMBER);
        if !any_member {
            rustls::client::verify_server_name(&parsed, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Who sent a request on the cluster port.
#[derive(Debug, Clone)]
pub enum PeerIdentity {
    /// A client certificate the handshake verified against the cluster's CA.
    Certificate(CertificateDer<'static>),
    /// No TLS on this port (loopback only): the peer cannot be told apart.
    Unauthenticated,
}

impl PeerIdentity {
    /// Whether this peer may speak for node `id`: its certificate names it, or the
    /// port has no TLS.
    pub fn is(&self, id: NodeId) -> bool {
        match self {
            PeerIdentity::Unauthenticated => true,
            PeerIdentity::Certificate(certificate) => {
                let Ok(parsed) = ParsedCertificate::try_from(certificate) else { return false };
                let Ok(name) = ServerName::try_from(node_name(id)) else { return false };
                rustls::client::verify_server_name(&parsed, &name).is_ok()
            }
        }
    }
}
