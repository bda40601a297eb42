//! TLS on `--proxy-tls-listen`: certificates and SNIs from the replicated config,
//! chosen per handshake from the current snapshot, so a certificate written through
//! the Admin API serves new connections without a restart.
//!
//! Lookup: the exact SNI name, then a wildcard `*.rest` for the name's parent domain.
//! A handshake whose name matches no SNI entity is refused (Kong would serve its
//! default self-signed certificate; Tollgate has none to serve).

use std::collections::HashMap;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::Value;
use tollgate_raft_store::state::{entity_id, foreign_id, ConfigState};
use tollgate_raft_store::EntityKind;

use crate::publish::Published;

/// Certificates by SNI name, compiled into each snapshot.
#[derive(Default)]
pub struct Certificates {
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

/// Parses a certificate chain and key from PEM, as the Admin API stores them.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|error| format!("cert: {error}"))?;
    if chain.is_empty() {
        return Err("cert: no certificate in the PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|error| format!("key: {error}"))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|error| format!("key: unsupported key: {error}"))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|error| format!("key: does not match the certificate: {error}"))?;
    Ok(certified)
}

impl Certificates {
    pub fn compile(state: &ConfigState) -> Certificates {
        let mut keys = HashMap::new();
        for certificate in state.table(EntityKind::Certificate).values() {
            let cert = certificate.get("cert").and_then(Value::as_str).unwrap_or_default();
            let key = certificate.get("key").and_then(Value::as_str).unwrap_or_default();
            match certified_key(cert, key) {
                Ok(certified) => {
                    keys.insert(entity_id(certificate), Arc::new(certified));
                }
                Err(error) => tracing::warn!(certificate = %entity_id(certificate), %error, "certificate not usable"),
            }
        }
        let mut by_name = HashMap::new();
        for sni in state.table(EntityKind::Sni).values() {
            let (Some(name), Some(certificate)) =
                (sni.get("name").and_then(Value::as_str), foreign_id(sni, "certificate"))
            else {
                continue;
            };
            if let Some(key) = keys.get(&certificate) {
                by_name.insert(name.to_ascii_lowercase(), key.clone());
            }
        }
        Certificates { by_name }
    }

    pub fn find(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = server_name.to_ascii_lowercase();
        if let Some(exact) = self.by_name.get(&name) {
            return Some(exact.clone());
        }
        let (_, parent) = name.split_once('.')?;
        self.by_name.get(&format!("*.{parent}")).cloned()
    }
}

/// Resolves each handshake against the snapshot published at that moment.
#[derive(Debug)]
pub struct SnapshotResolver {
    published: Arc<Published>,
}

impl ResolvesServerCert for SnapshotResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        self.published.load().proxy.certificates.find(name)
    }
}

/// The rustls server configuration of the TLS listener: TLS 1.2 and 1.3, ALPN h2 and
/// http/1.1, certificates from the snapshot.
pub fn server_config(published: Arc<Published>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SnapshotResolver { published }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
